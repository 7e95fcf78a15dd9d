"""The worker's request path alone: this server's HTTP layer over an engine that only paces tokens.

On a GPU the model's step is short (an H200 steps 64 sequences of a 1.7B model in about 5.6 ms), and what a worker
does in Python per token bounds what it serves: handing updates to request threads, decoding, JSON, socket writes.
This runs the real gunicorn worker, Flask routes, text path (engines/generation.py) and tokenizer over
`PacedEngine`, an engine that gives every running sequence one token per step and does nothing else, so that a
machine without a GPU can measure what the request path carries: bench.py's output tok/s against the pace's own
ceiling (sequences running at once / step time). Not a model: its tokens cycle through a fixed text.

A step takes --step-ms plus --step-ms-per-seq for each running sequence. The defaults follow vLLM in-process on
one H200 with the 1.7B shape (docs/benchmarks.md): 64 sequences at 11,476 tok/s (5.6 ms a step) and 256 at
21,768 (11.8 ms).

Usage: python scripts/bench_request_path.py [--step-ms 3.5] [--step-ms-per-seq 0.032] [--concurrency 64 256] \\
           [--duration 10] [--modes stream whole] [--stream-interval 1] [--out results/request-path]
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit, gunicorn_llm

from gunicorn_llm.engines.base import ChoiceUpdate, Engine, GenerationStream  # noqa: E402
from gunicorn_llm.request_schema import SamplingParams  # noqa: E402

STEP_MS_ENV, PER_SEQ_MS_ENV = "PACED_STEP_MS", "PACED_STEP_MS_PER_SEQ"
# what the paced tokens spell, over and over: ordinary words, so that decoding them is ordinary work
TEXT = ("The request path of a serving worker hands every new token to the thread that answers its client, which "
        "decodes it, finds stop strings, and writes it out as JSON. ")


@dataclass
class _Sequence:
    stream: GenerationStream
    choice: int
    max_tokens: int
    produced: int = 0
    aborted: list = field(default_factory=lambda: [False])  # shared by a request's choices


class PacedEngine(Engine):
    """One token per running sequence per step, from one thread, as vLLM's engine loop hands them on; a step takes
    PACED_STEP_MS plus PACED_STEP_MS_PER_SEQ per running sequence."""

    def __init__(self, model_path: str, model_name: str, settings):
        from transformers import AutoTokenizer

        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_token_ids = ()
        self.max_model_len = settings.max_model_len or 4096
        self.step_s = float(os.environ[STEP_MS_ENV]) / 1000
        self.per_sequence_s = float(os.environ[PER_SEQ_MS_ENV]) / 1000
        self.stream_interval = settings.stream_interval
        self._tokens = self.tokenizer.encode(TEXT, add_special_tokens=False)
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._running: list[_Sequence] = []
        threading.Thread(target=self._drive, name="paced-engine", daemon=True).start()

    def start(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        aborted = [False]
        stream = GenerationStream(params.n, abort=lambda: aborted.__setitem__(0, True), interval=self.stream_interval)
        for choice in range(params.n):
            self._incoming.put(_Sequence(stream, choice, params.max_tokens, aborted=aborted))
        return stream

    def prompt_logprobs(self, prompts, top=0, deadline=None):
        raise NotImplementedError("the paced engine has no model to score prompts with")

    def running(self) -> int:
        return len(self._running)

    def _drive(self) -> None:
        tokens = itertools.cycle(self._tokens)
        next_step = time.monotonic()
        while True:
            block = not self._running
            while True:
                try:
                    self._running.append(self._incoming.get(block=block))
                except queue.Empty:
                    break
                block = False
            next_step = max(next_step + self.step_s + self.per_sequence_s * len(self._running), time.monotonic())
            time.sleep(max(0.0, next_step - time.monotonic()))
            self.step_taken()
            still = []
            for sequence in self._running:
                if sequence.aborted[0]:
                    continue
                sequence.produced += 1
                done = sequence.produced >= sequence.max_tokens
                sequence.stream.publish(ChoiceUpdate(sequence.choice, [next(tokens)], None, "length" if done else None))
                if not done:
                    still.append(sequence)
            self._running = still


def __getattr__(name: str):
    # gunicorn's `scripts.bench_request_path:app`, built only in the worker (running this file builds none)
    if name == "app":
        from gunicorn_llm.http.app import app_for

        globals()["app"] = app_for(PacedEngine)
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    from benchkit.servers import ServerProcess, Servers, free_port
    from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME, resolve_model

    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--step-ms", type=float, default=3.5, help="a step's time, and ...")
    cli.add_argument("--step-ms-per-seq", type=float, default=0.032, help="... this per running sequence")
    cli.add_argument("--workers", type=int, default=1,
                     help="gunicorn workers, each with a paced engine of its own at the full pace (not a shared GPU)")
    cli.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    cli.add_argument("--duration", type=float, default=10)
    cli.add_argument("--output-len", type=int, default=128)
    cli.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    cli.add_argument("--client-processes", type=int, default=2)
    cli.add_argument("--modes", nargs="+", choices=("stream", "whole"), default=["stream", "whole"])
    cli.add_argument("--out", type=Path, default=ROOT / "results" / "request-path")
    options = cli.parse_args()
    options.out.parent.mkdir(parents=True, exist_ok=True)

    model = resolve_model(None)  # the embedded model: its tokenizer and name; no weights are loaded
    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(model), "INFER_TYPE": "transformers", "PORT": str(port),
           "CPU_WORKERS": str(options.workers), "THREADS": "4096", "MAX_WAITING": "4096",
           "STREAM_INTERVAL": str(options.stream_interval),
           STEP_MS_ENV: str(options.step_ms), PER_SEQ_MS_ENV: str(options.step_ms_per_seq),
           "GPU_IDS": "", "CUDA_VISIBLE_DEVICES": "",
           "DISPATCHER_STATE": str(options.out.parent / f"request-path-slices-{port}.json")}
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn_conf.py", "scripts.bench_request_path:app"]
    with Servers() as servers:
        server = servers.add(ServerProcess(command, port, Path(f"{options.out}.log"), env, cwd=ROOT))
        server.wait_loaded(options.workers, timeout_s=120)
        for mode in options.modes:
            pace = [f"{c * 1000 / (options.step_ms + c * options.step_ms_per_seq):,.0f}"
                    for c in options.concurrency]
            print(f"{mode}: the pace's ceiling at concurrency {options.concurrency}: {', '.join(pace)} tok/s",
                  flush=True)
            subprocess.run([sys.executable, str(ROOT / "bench.py"), "--url", f"paced={server.url}@completions",
                            "--tokenizer", str(model), "--model", EMBEDDED_MODEL_NAME, "--no-progress",
                            "--concurrency", *map(str, options.concurrency), "--duration", str(options.duration),
                            "--client-processes", str(options.client_processes), "--prompt-len", "16",
                            "--output-len", str(options.output_len),
                            "--stream" if mode == "stream" else "--no-stream",
                            "--json", f"{options.out}-{mode}.json"], check=False)


if __name__ == "__main__":
    main()
