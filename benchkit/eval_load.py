"""The evaluation harness's load (lm-evaluation-harness's `local-completions` shape), drawn from a seed: multiple-choice
items scored as echoed log-probabilities, and generate-until prompts. scripts/bench_eval_load.py sends it to servers;
scripts/probe_scoring_host.py runs it through the transformers engine in-process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

LOGLIKELIHOOD = {"max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0, "seed": 1234}
STOP = "\n\n"


@dataclass(frozen=True)
class Load:
    choices: list[tuple[str, list[str]]]  # (context, 4 options)
    prompts: list[str]  # generate-until prompts


def make_load(tokenizer, items: int, generations: int, seed: int, fewshot: int = 0) -> Load:
    rng = random.Random(seed)
    vocab = range(100, tokenizer.vocab_size - 100)

    def text(length: int) -> str:
        return tokenizer.decode([rng.choice(vocab) for _ in range(length)])

    choices = [(text(rng.randint(100, 500)), [" " + text(rng.randint(1, 8)).strip() for _ in range(4)])
               for _ in range(items)]
    prompts = [text(200) for _ in range(generations)]
    shots = "".join(f"{text(rng.randint(30, 80))} {text(rng.randint(1, 8)).strip()}\n\n" for _ in range(fewshot))
    return Load([(shots + context, options) for context, options in choices], [shots + prompt for prompt in prompts])


def loglikelihood_body(context: str, option: str, model: str | None = None) -> dict:
    """One option's /v1/completions request, as lm-eval's local-completions sends it."""
    return {"prompt": context + option, **LOGLIKELIHOOD, **({"model": model} if model else {})}
