"""The evaluation harness's load (lm-evaluation-harness's `local-completions` shape), drawn from a seed: multiple-choice
items scored as echoed log-probabilities of token-id prompts, and generate-until prompts. scripts/bench_eval_load.py
sends it to servers; scripts/probe_scoring_host.py runs it through the transformers engine in-process.
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
    encoded: list[tuple[list[int], int]]  # each option's prompt ids and context tokens (encode_pair), item by item


def make_load(tokenizer, items: int, generations: int, seed: int, fewshot: int = 0) -> Load:
    rng = random.Random(seed)
    vocab = range(100, tokenizer.vocab_size - 100)

    def text(length: int) -> str:
        return tokenizer.decode([rng.choice(vocab) for _ in range(length)])

    choices = [(text(rng.randint(100, 500)), [" " + text(rng.randint(1, 8)).strip() for _ in range(4)])
               for _ in range(items)]
    prompts = [text(200) for _ in range(generations)]
    shots = "".join(f"{text(rng.randint(30, 80))} {text(rng.randint(1, 8)).strip()}\n\n" for _ in range(fewshot))
    choices = [(shots + context, options) for context, options in choices]
    encoded = [encode_pair(tokenizer, context, option) for context, options in choices for option in options]
    return Load(choices, [shots + prompt for prompt in prompts], encoded)


def encode_pair(tokenizer, context: str, option: str) -> tuple[list[int], int]:
    """An option's prompt as lm-eval's local-completions sends it (token ids, its default): context and option
    encoded whole, and how many of those ids are the context's, the context encoded alone (lm-eval's `_encode_pair`,
    which also moves the context's trailing spaces to the option). The option's log-likelihood is the sum over the
    ids after those: counted by tokens, not by the texts' offsets that servers name tokens with."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, option = context[:-spaces], context[-spaces:] + option
    whole = tokenizer.encode(context + option, add_special_tokens=False)
    return whole, len(tokenizer.encode(context, add_special_tokens=False))


def loglikelihood_body(prompt_ids: list[int], model: str | None = None) -> dict:
    """One option's /v1/completions request, as lm-eval's local-completions sends it."""
    return {"prompt": prompt_ids, **LOGLIKELIHOOD, **({"model": model} if model else {})}
