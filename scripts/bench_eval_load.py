"""An evaluation harness's load, timed end to end: lm-evaluation-harness-shaped requests against servers, and the
same requests through lm-eval's in-process `hf` model.

The load is drawn from --seed, the same for every target:
- --items multiple-choice items, each a context of 100-500 random tokens and 4 options of 1-8 tokens, scored as
  lm-eval's `local-completions` scores them: one request per context and option, the prompt the token ids of the
  context and option encoded together (lm-eval's default), `echo: true, logprobs: 1, max_tokens: 1, temperature: 0,
  seed: 1234`; the option's log-likelihood is the sum of the echoed log-probabilities after the context's tokens
  (counted as lm-eval counts them: by the context encoded alone, not by the servers' text offsets);
- --generations greedy generate-until requests: a 200-token prompt, up to --max-gen-tokens new tokens, stop
  "\\n\\n", `seed: 1234`;
- with --fewshot N, every context and every generate-until prompt starts with the same N examples (a 30-80-token
  question, a space, a 1-8-token answer, a blank line), as a few-shot task repeats them (drawn after the rest: the
  load without them is unchanged).
Requests go out from --concurrency client threads, log-likelihoods first, then generations.

Targets: NAME=URL for an OpenAI-compatible server (this server with either engine, vLLM's own server), and
`--hf MODEL_DIR` for lm-eval's `HFLM` (batch_size auto, bf16 on a GPU) on the same requests in this process (where
servers hold the GPU, run it after them: `--results` of the servers' run, then `--hf` with `--earlier`). Prints
one row per target: seconds for the log-likelihoods, for the generations, in all, and the first target's time over
this one's (above 1: faster). The chosen options' agreement with the first target is printed too (the argmax of
the four log-likelihoods per item), a check that every target scored the same thing, and then each item chosen
differently, with the margins by which each side preferred its option (a near-tie or not).

Usage: python scripts/bench_eval_load.py --tokenizer MODEL_DIR --url ours=http://127.0.0.1:5002 \\
           --url vllm=http://127.0.0.1:8000 --hf MODEL_DIR [--items 1000] [--generations 200] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit
from benchkit.eval_load import STOP, Load, loglikelihood_body, make_load  # noqa: E402
from benchkit.load import send_all  # noqa: E402


def option_loglikelihood(url: str, model: str | None, prompt_ids: list[int], context_tokens: int, session) -> float:
    """As lm-eval's local-completions: the echoed prompt's token log-probabilities after the context's tokens."""
    answer = session.post(f"{url}/v1/completions", json=loglikelihood_body(prompt_ids, model), timeout=600)
    answer.raise_for_status()
    values = answer.json()["choices"][0]["logprobs"]["token_logprobs"]
    # the prompt's tokens only: the echoed entries go on with the token generated after it (max_tokens 1)
    return sum(values[context_tokens : len(prompt_ids)])


def generate_until(url: str, model: str | None, prompt: str, max_tokens: int, session) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": [STOP], "seed": 1234,
            **({"model": model} if model else {})}
    answer = session.post(f"{url}/v1/completions", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()["choices"][0]["text"]


def run_server(url: str, model: str | None, load: Load, options) -> tuple[float, float, list[int]]:
    """Seconds for the log-likelihoods, seconds for the generations, and each item's most likely option."""
    # one connection per client, kept alive as lm-eval's client does
    sessions = [requests.Session() for _ in range(options.concurrency)]
    started = time.perf_counter()
    scores = send_all(lambda client, pair: option_loglikelihood(url, model, *pair, sessions[client]),
                      load.encoded, options.concurrency)
    scored = time.perf_counter()
    send_all(lambda client, prompt: generate_until(url, model, prompt, options.max_gen_tokens, sessions[client]),
             load.prompts, options.concurrency)
    return scored - started, time.perf_counter() - scored, scores


def run_hf(model_dir: str, load: Load, options) -> tuple[float, float, list[int]]:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # batch_size auto probes the largest batch that fits: on a GPU; on CPU (checking the script) it only swaps
    lm = HFLM(pretrained=model_dir, batch_size="auto" if device == "cuda" else 8, device=device,
              dtype="bfloat16" if device == "cuda" else "float32")
    pairs = [Instance("loglikelihood", {}, (context, option), i)
             for i, (context, opts) in enumerate(load.choices) for option in opts]
    until = {"until": [STOP], "max_gen_toks": options.max_gen_tokens, "do_sample": False}
    prompts = [Instance("generate_until", {}, (prompt, until), i) for i, prompt in enumerate(load.prompts)]
    started = time.perf_counter()
    scores = [loglikelihood for loglikelihood, _ in lm.loglikelihood(pairs)]
    scored = time.perf_counter()
    lm.generate_until(prompts)
    return scored - started, time.perf_counter() - scored, scores


def _choices(scores: list[float]) -> list[int]:
    return [max(range(4), key=lambda k: scores[i + k]) for i in range(0, len(scores), 4)]


def print_differing(results: dict) -> None:
    """For each item where a target chose another option than the first target: each target's margin between the
    first target's choice and its own (0 where they agree), in nats. A margin far below the differences between
    the targets' numerics (bf16 kernels, float32 rounding) is a near-tie, not a scoring error."""
    first_name, (*_, first_scores) = next(iter(results.items()))
    first_choices = _choices(first_scores)
    for name, (*_, scores) in list(results.items())[1:]:
        for item, (theirs, ours) in enumerate(zip(_choices(scores), first_choices, strict=True)):
            if theirs != ours:
                at = 4 * item
                print(f"item {item}: {name} chose option {theirs} by {scores[at + theirs] - scores[at + ours]:.2e} "
                      f"nats over option {ours}, which {first_name} chose by "
                      f"{first_scores[at + ours] - first_scores[at + theirs]:.2e}", flush=True)


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--url", action="append", default=[], metavar="NAME=URL")
    cli.add_argument("--hf", metavar="MODEL_DIR", help="also time lm-eval's in-process hf model on this model")
    cli.add_argument("--tokenizer", required=True, help="tokenizer folder (draws the random texts)")
    cli.add_argument("--model", help="model name the servers are asked for (default: left out)")
    cli.add_argument("--items", type=int, default=1000)
    cli.add_argument("--generations", type=int, default=200)
    cli.add_argument("--max-gen-tokens", type=int, default=64)
    cli.add_argument("--concurrency", type=int, default=64)
    cli.add_argument("--seed", type=int, default=0)
    cli.add_argument("--fewshot", type=int, default=0, help="examples every context and prompt starts with")
    cli.add_argument("--results", type=Path, help="write every target's times and scores here (JSON)")
    cli.add_argument("--earlier", type=Path, help="--results of an earlier run on the same load: its targets lead "
                     "the table (lm-eval's hf model after the servers have freed the GPU)")
    options = cli.parse_args()
    from transformers import AutoTokenizer

    load = make_load(AutoTokenizer.from_pretrained(options.tokenizer), options.items, options.generations,
                     options.seed, options.fewshot)
    results = json.loads(options.earlier.read_text()) if options.earlier else {}
    for spec in options.url:
        name, _, url = spec.partition("=")
        client_cpu = time.process_time()
        results[name] = run_server(url.rstrip("/"), options.model, load, options)
        client_cpu = time.process_time() - client_cpu
        # The client threads share one interpreter lock: CPU seconds near the wall time mean the client was the bound.
        print(f"{name}: {results[name][0]:.1f} s log-likelihoods, {results[name][1]:.1f} s generations, "
              f"{client_cpu:.1f} s of the client's CPU", flush=True)
    if options.hf:
        try:
            results["lm-eval hf"] = run_hf(options.hf, load, options)
        except Exception as error:  # noqa: BLE001 - e.g. lm-eval missing where the servers ran: their table stands
            print(f"lm-eval hf: failed: {error!r}", flush=True)
        else:
            print(f"lm-eval hf: {results['lm-eval hf'][0]:.1f} s log-likelihoods, "
                  f"{results['lm-eval hf'][1]:.1f} s generations", flush=True)
    print(f"\n{options.items} items x 4 options, {options.generations} generations, concurrency "
          f"{options.concurrency}{f', {options.fewshot}-shot' if options.fewshot else ''}\n")
    print("| target | log-likelihoods (s) | generations (s) | total (s) | first / this | same choices as first |")
    print("| --- | --- | --- | --- | --- | --- |")
    first = next(iter(results.values()), None)
    for name, (scoring, generating, scores) in results.items():
        chosen = _choices(scores)
        agree = sum(a == b for a, b in zip(chosen, _choices(first[2]), strict=True))
        print(f"| {name} | {scoring:.1f} | {generating:.1f} | {scoring + generating:.1f} | "
              f"{(first[0] + first[1]) / (scoring + generating):.2f} | {agree}/{len(chosen)} |")
    if results:
        print()
        print_differing(results)
    if options.results:
        options.results.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
