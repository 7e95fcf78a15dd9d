"""The slot engine (gunicorn_llm/engines/transformers_slots.py) in-process, without HTTP: its ceiling, and whether
its steps are right.

On a random-weight Llama of the given shape: the time to capture its decode graphs; output tok/s for N requests
of P prompt tokens and O new tokens (greedy, EOS ignored) submitted at once, with graphs and with eager steps; and
the greedy tokens of a few prompts, from graph steps against eager steps (the same kernels: they must agree) and
against plain `generate` one prompt at a time in float32 (other kernels: near-ties may flip late tokens).

Usage: python scripts/probe_slots.py CONFIG_AND_TOKENIZER_DIR [--shape 135m|1.7b] [--requests 64 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit, gunicorn_llm
from benchkit.models import add_probe_arguments, probe_prompts, random_model  # noqa: E402
from gunicorn_llm.engines.transformers_slots import SlotBatching  # noqa: E402
from gunicorn_llm.request_schema import SamplingParams  # noqa: E402


def cache_bytes() -> int:
    """Half of what is free on the GPU; 1 GiB on CPU."""
    return torch.cuda.mem_get_info()[0] // 2 if torch.cuda.is_available() else 1 << 30


def engine(model, slots: int, max_len: int, graphs: bool) -> tuple[SlotBatching, float]:
    started = time.perf_counter()
    built = SlotBatching(model, slots, max_len, cache_bytes=cache_bytes(), cuda_graphs=graphs, on_death=print,
                         on_step=lambda: None)
    return built, time.perf_counter() - started


def generate_all(slots: SlotBatching, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    streams = [slots.start(prompt, params, frozenset()) for prompt in prompts]
    return [[token for update in stream for token in update.token_ids] for stream in streams]


def throughput(slots: SlotBatching, count: int, prompt_len: int, new_tokens: int) -> float:
    prompts = probe_prompts(count, prompt_len)
    generate_all(slots, prompts[:4], 4)  # warm-up: allocator, kernels' first launch
    started = time.perf_counter()
    tokens = sum(map(len, generate_all(slots, prompts, new_tokens)))
    return tokens / (time.perf_counter() - started)


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b, strict=True))
    first_split = [next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), len(x))
                   for x, y in zip(a, b, strict=True)]
    return f"{same}/{len(a)} identical; tokens until the first difference: {first_split}"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(cli)
    cli.add_argument("--slots", type=int, default=128)
    cli.add_argument("--max-len", type=int, default=512)
    options = cli.parse_args()
    model = random_model(options.source, options.shape)
    on_gpu = model.device.type == "cuda"
    print(f"{options.shape}: torch {torch.__version__}, {torch.cuda.get_device_name() if on_gpu else 'CPU'}; "
          f"{options.slots} slots of {options.max_len} tokens", flush=True)

    rows = []
    for graphs in ([True, False] if on_gpu else [False]):
        slots, load_s = engine(model, options.slots, options.max_len, graphs)
        figures = [f"{throughput(slots, n, options.prompt_len, options.output_len):.0f}" for n in options.requests]
        rows.append(f"| {'CUDA graphs' if graphs else 'eager steps'} | {load_s:.1f} | " + " | ".join(figures) + " |")
        print(rows[-1], flush=True)
        del slots
    print("| steps | set-up (s) | " + " | ".join(f"{n} requests (tok/s)" for n in options.requests) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in options.requests) + " |")
    print("\n".join(rows))

    prompts = [[(11 * i + 5 * j) % 30000 + 100 for j in range(8 + 9 * i)] for i in range(6)]
    model = model.float()
    eager = generate_all(engine(model, 4, 256, False)[0], prompts, 32)
    if on_gpu:
        print("graph vs eager steps (float32):", agreement(generate_all(engine(model, 4, 256, True)[0], prompts, 32),
                                                         eager))
    plain = [model.generate(torch.tensor([p], device=model.device), max_new_tokens=32, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    print("slot steps vs plain generate (float32):", agreement(eager, plain))


if __name__ == "__main__":
    main()
