"""Decoding from many threads at once: vLLM's tokenizer (`LLMEngine.get_tokenizer()`) against a plain one.

vLLM wraps its tokenizer in a pool (vllm/tokenizers/hf.py, `maybe_make_thread_pool`) of two copies; a call that
finds both in use deep-copies the whole tokenizer, and the copy joins the pool. vLLM's own server calls it from one
event loop and a small executor, so the pool stays small; a gunicorn worker calls it from every request thread.
This times the same decodes, from --threads threads started together, through the pool and through the plain
tokenizer the vLLM engine now uses (gunicorn_llm/engines/vllm_engine.py), and prints what one deep copy costs.

Usage: python scripts/bench_tokenizer_threads.py [--tokenizer MODEL_DIR] [--threads 64 256] [--decodes 200]
"""

from __future__ import annotations

import argparse
import copy
import sys
import threading
import time
from pathlib import Path

from transformers import AutoTokenizer
from vllm.tokenizers.hf import maybe_make_thread_pool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gunicorn_llm.engines.model_store import resolve_model  # noqa: E402


def timed_decodes(tokenizer, threads: int, decodes: int, ids: list[int]) -> float:
    """Seconds for `threads` threads, started together, to make `decodes` decodes each (as a stream's text path)."""
    start = threading.Barrier(threads + 1)

    def decode_all() -> None:
        start.wait()
        for i in range(decodes):
            tokenizer.decode(ids[: 2 + i % len(ids)])

    workers = [threading.Thread(target=decode_all) for _ in range(threads)]
    for worker in workers:
        worker.start()
    began = time.perf_counter()
    start.wait()
    for worker in workers:
        worker.join()
    return time.perf_counter() - began


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--tokenizer", help="model folder (default: the embedded model)")
    cli.add_argument("--threads", type=int, nargs="+", default=[64, 256])
    cli.add_argument("--decodes", type=int, default=200, help="decodes per thread")
    options = cli.parse_args()
    plain = AutoTokenizer.from_pretrained(options.tokenizer or str(resolve_model(None)))
    ids = plain.encode("The quick brown fox jumps over the lazy dog, again and again. " * 10)  # 130 tokens
    began = time.perf_counter()
    copy.deepcopy(plain)
    print(f"one deep copy of the tokenizer: {(time.perf_counter() - began) * 1000:.1f} ms")
    copies = count_deep_copies()
    print(f"{'threads':>7} {'tokenizer':>22} {'seconds':>8} {'decodes/s':>10} {'copies made':>11}")
    for threads in options.threads:
        pooled = maybe_make_thread_pool(copy.copy(plain), copies=2)  # as vLLM's renderer builds it
        for name, tokenizer in (("vLLM's (pooled copies)", pooled), ("plain", plain)):
            before = copies[0]
            seconds = timed_decodes(tokenizer, threads, options.decodes, ids)
            print(f"{threads:>7} {name:>22} {seconds:>8.2f} {threads * options.decodes / seconds:>10,.0f} "
                  f"{copies[0] - before:>11}", flush=True)


def count_deep_copies() -> list[int]:
    """Counts the pool's deep copies of the tokenizer (copy.deepcopy, as vllm/tokenizers/hf.py calls it)."""
    count, deepcopy = [0], copy.deepcopy

    def counted(value, *args):
        if args == ():  # the pool's own call: copy.deepcopy(tokenizer); deepcopy recurses with a memo argument
            count[0] += 1
        return deepcopy(value, *args)

    copy.deepcopy = counted
    return count


if __name__ == "__main__":
    main()
