"""What a structured-output row costs the slot engine (gunicorn_llm/engines/transformers_slots.py) in-process, and
what the unconstrained rows beside it lose.

On a random-weight Llama of the given shape, three runs alternate (the repeats interleaved, so that a busy machine
slows all three alike): (A) N unconstrained greedy requests alone (EOS ignored, a fixed output length); (B) the same
N submitted together with M constrained ones (a JSON schema, a regex and a choice in turn, greedy; each cut at the
output length or ended at its grammar's end); (C) the same N with M unconstrained stand-ins, each as long as its
constrained counterpart ran in B, so that B and C step through batches of the same rows and differ only by the
grammars: (B - C) per constrained row per decode step is the mask and matcher cost, which is also timed directly
(the engine's calls into grammars.py, wrapped). The order of A, B and C rotates between repeats. Prints each
repeat and the medians: the unconstrained rows' output tok/s (submission to their last token), the mean decode
step and the grammar calls' time per step, with B/A and B/C.

Usage: python scripts/bench_constrained_rows.py [CONFIG_AND_TOKENIZER_DIR] [--shape 135m|1.7b] [--requests 16]
           [--constrained 8] [--output-len 32] [--repeats 3]
(the folder defaults to the embedded model's; on CPU the model runs in float32, as the engine does there)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit, gunicorn_llm
from benchkit.models import SHAPES, probe_prompts, random_model  # noqa: E402
from gunicorn_llm.engines import transformers_sampling, transformers_slots  # noqa: E402
from gunicorn_llm.engines.grammars import Grammars  # noqa: E402
from gunicorn_llm.engines.model_store import embedded_model_dir  # noqa: E402
from gunicorn_llm.engines.transformers_slots import SlotBatching  # noqa: E402
from gunicorn_llm.request_schema import SamplingParams  # noqa: E402

# Constraints a random model tends to run long in (free strings and words), and one that ends within a few tokens
CONSTRAINTS = [
    {"json": {"type": "object", "properties": {"name": {"type": "string"}, "score": {"type": "integer"}},
              "required": ["name", "score"]}},
    {"regex": r"[a-z]+( [a-z]+)*\."},
    {"choice": ["yes", "no", "maybe"]},
]


class StepClock:
    """The engine's on_step callback: the time of every decode step since the last reset."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self) -> None:
        self.times.append(time.perf_counter())

    def mean_step(self) -> float:
        """Mean seconds between consecutive decode steps (the prefill before the first one left out)."""
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


class GrammarClock:
    """Seconds spent in the slot engine's calls into grammars.py (the mask of each step's logits and the matchers'
    advance), since the last reset: it wraps the names the engine's modules imported."""

    def __init__(self):
        self.seconds = 0.0
        for module, name in ((transformers_sampling, "mask_logits"), (transformers_slots, "advance")):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, function):
        def timed(*args):
            started = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def greedy(max_tokens: int, constraint: dict | None = None) -> SamplingParams:
    return SamplingParams.model_validate({"temperature": 0.0, "ignore_eos": True, "max_tokens": max_tokens,
                                          "structured_outputs": constraint})


def run(slots: SlotBatching, clock: StepClock, grammar_clock: GrammarClock, prompts: list[list[int]],
        plain: SamplingParams, others: list[SamplingParams]) -> dict:
    """The first len(prompts) - len(others) prompts with `plain`, the rest with `others`, prefilled together; the
    unconstrained rows' tok/s, the mean decode step, the grammar calls' time per step, and the tokens each of
    `others` produced."""
    count = len(prompts) - len(others)
    clock.times.clear()
    grammar_clock.seconds = 0.0
    started = time.perf_counter()
    with slots.paused():  # all queued before the loop takes any: one prefill, one batch
        streams = [slots.start(prompt, params, frozenset())
                   for prompt, params in zip(prompts, [plain] * count + others, strict=True)]
    plain_tokens = sum(len(update.token_ids) for stream in streams[:count] for update in stream)
    plain_seconds = time.perf_counter() - started  # every unconstrained row has its last token
    other_lengths = [sum(len(update.token_ids) for update in stream) for stream in streams[count:]]
    return {"tok/s": plain_tokens / plain_seconds, "step": clock.mean_step(),
            "grammar": grammar_clock.seconds / len(clock.times), "lengths": other_lengths}


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("source", type=Path, nargs="?", help="folder with config.json and tokenizer (default: the "
                                                          "embedded model's)")
    cli.add_argument("--shape", choices=SHAPES, default="135m")
    cli.add_argument("--requests", type=int, default=16, help="N: unconstrained requests")
    cli.add_argument("--constrained", type=int, default=8, help="M: constrained requests beside them")
    cli.add_argument("--prompt-len", type=int, default=64)
    cli.add_argument("--output-len", type=int, default=32)
    cli.add_argument("--repeats", type=int, default=3)
    options = cli.parse_args()
    source = options.source or embedded_model_dir()
    model = random_model(source, options.shape)
    on_gpu = model.device.type == "cuda"
    if not on_gpu:
        model = model.float()
    tokenizer = AutoTokenizer.from_pretrained(source)
    grammars = Grammars(tokenizer, model.get_output_embeddings().weight.shape[0], [tokenizer.eos_token_id])
    clock, grammar_clock = StepClock(), GrammarClock()
    rows = options.requests + options.constrained
    slots = SlotBatching(model, rows, options.prompt_len + options.output_len + 8,
                         cache_bytes=torch.cuda.mem_get_info()[0] // 2 if on_gpu else 1 << 30,
                         cuda_graphs=on_gpu, on_death=print, on_step=clock, grammars=grammars)
    print(f"{options.shape}: torch {torch.__version__}, {torch.cuda.get_device_name() if on_gpu else 'CPU'}, "
          f"{model.dtype}; N={options.requests} unconstrained + M={options.constrained} constrained, "
          f"{options.prompt_len} prompt and {options.output_len} output tokens", flush=True)

    prompts = probe_prompts(rows, options.prompt_len)
    plain = greedy(options.output_len)
    constrained = [greedy(options.output_len, CONSTRAINTS[i % len(CONSTRAINTS)]) for i in range(options.constrained)]
    run(slots, clock, grammar_clock, prompts[:4], greedy(4), [])  # warm-up: allocator, kernels' first launch
    lengths = run(slots, clock, grammar_clock, prompts, plain, constrained)["lengths"]  # also compiles the grammars
    print(f"constrained rows' tokens (greedy, the same every repeat): {lengths}; {sum(lengths)} in all, "
          f"{sum(n == options.output_len for n in lengths)} cut at max_tokens", flush=True)
    stand_ins = [greedy(n) for n in lengths]
    runs = {"A": (prompts[:options.requests], []), "B": (prompts, constrained), "C": (prompts, stand_ins)}
    figures: dict[str, list[dict]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(options.repeats):
        for name in names[repeat % 3:] + names[:repeat % 3]:  # A B C, B C A, C A B, ...
            batch, others = runs[name]
            figures[name].append(run(slots, clock, grammar_clock, batch, plain, others))
            last = figures[name][-1]
            print(f"repeat {repeat + 1} {name}: {last['tok/s']:.1f} unconstrained tok/s, {last['step'] * 1e3:.2f} "
                  f"ms/step, {last['grammar'] * 1e3:.2f} ms/step in grammar calls", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(figure[key] for figure in figures[name])

    def each(name: str, key: str, scale: float = 1.0) -> str:
        return ", ".join(f"{figure[key] * scale:.1f}" for figure in figures[name])

    labels = {"A": f"A: {options.requests} unconstrained alone",
              "B": f"B: {options.requests} unconstrained + {options.constrained} constrained",
              "C": f"C: {options.requests} unconstrained + {options.constrained} unconstrained stand-ins"}
    print("\n| run | unconstrained rows' tok/s (each; median) | decode step, ms (each; median) | grammar calls, ms "
          "per step (median) |")
    print("| --- | --- | --- | --- |")
    for name, label in labels.items():
        print(f"| {label} | {each(name, 'tok/s')}; {median(name, 'tok/s'):.1f} | "
              f"{each(name, 'step', 1e3)}; {median(name, 'step') * 1e3:.1f} | {median(name, 'grammar') * 1e3:.2f} |")
    # the constrained rows' row-steps: each decoded token but the first (that one comes from the prefill)
    row_steps = sum(max(n - 1, 0) for n in lengths)
    steps = options.output_len - 1
    def per_row_step(key: str) -> float:
        """The B - C difference of `key` (seconds a step), per constrained row-step."""
        return (median("B", key) - median("C", key)) * steps / row_steps if row_steps else float("nan")

    print(f"\nB/A, the unconstrained rows' tok/s beside constrained rows against alone: "
          f"{median('B', 'tok/s') / median('A', 'tok/s'):.3f}")
    print(f"B/C, the same rows with the grammars against without: unconstrained tok/s "
          f"{median('B', 'tok/s') / median('C', 'tok/s'):.3f}, decode step "
          f"{median('B', 'step') / median('C', 'step'):.3f}; per constrained row per step: "
          f"{per_row_step('step') * 1e6:.0f} us of step time, {per_row_step('grammar') * 1e6:.0f} us in grammar "
          f"calls ({row_steps} constrained "
          f"row-steps over {steps} steps)")


if __name__ == "__main__":
    main()
