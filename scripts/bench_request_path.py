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

With `--frontends K ...` the workers are this server's vLLM front ends instead (the real vLLM engine client, its
output processing and detokenizing), over one vLLM engine core per server whose model step is the same pace
(benchkit/paced_executor.py): K = 1 is the GPU default (one worker, the core in a process of its own), K > 1 the
shared core (`--workers-per-gpu K`). That predicts what more front ends give on a GPU, as far as this machine's
cores allow: K front ends, the core and the clients share them.

Usage: python scripts/bench_request_path.py [--step-ms 3.5] [--step-ms-per-seq 0.032] [--concurrency 64 256] \\
           [--duration 10] [--modes stream whole] [--stream-interval 1] [--frontends 1 2 4] [--out results/request-path]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit, gunicorn_llm

from benchkit.pace import PER_SEQ_MS_ENV, STEP_MS_ENV, Pace, paced_tokens  # noqa: E402
from gunicorn_llm.engines.base import ChoiceUpdate, Engine, GenerationStream  # noqa: E402
from gunicorn_llm.request_schema import SamplingParams  # noqa: E402

PACED_EXECUTOR = "benchkit.paced_executor.PacedExecutor"  # imported by vLLM in the engine core, not here


@dataclass
class _Sequence:
    stream: GenerationStream
    choice: int
    max_tokens: int
    produced: int = 0
    aborted: list = field(default_factory=lambda: [False])  # shared by a request's choices


class PacedEngine(Engine):
    """One token per running sequence per step, from one thread, as vLLM's engine loop hands them on, at the pace of
    benchkit/pace.py."""

    def __init__(self, model_path: str, model_name: str, settings):
        from transformers import AutoTokenizer

        self.model_name = model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_token_ids = ()
        self.max_model_len = settings.max_model_len or 4096
        self.stream_interval = settings.stream_interval
        self._pace = Pace()
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
        tokens = paced_tokens(self.tokenizer)
        while True:
            block = not self._running
            while True:
                try:
                    self._running.append(self._incoming.get(block=block))
                except queue.Empty:
                    break
                block = False
            self._pace.step(len(self._running))
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
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--step-ms", type=float, default=3.5, help="a step's time, and ...")
    cli.add_argument("--step-ms-per-seq", type=float, default=0.032, help="... this per running sequence")
    cli.add_argument("--workers", type=int, default=1,
                     help="gunicorn workers, each with a paced engine of its own at the full pace (not a shared GPU)")
    cli.add_argument("--frontends", type=int, nargs="+",
                     help="instead: vLLM front ends over one paced vLLM engine core, one server per K given (1: one "
                     "worker, its engine core in a process of its own, the GPU default; K > 1: --workers-per-gpu K)")
    cli.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    cli.add_argument("--duration", type=float, default=10)
    cli.add_argument("--output-len", type=int, default=128)
    cli.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    cli.add_argument("--client-processes", type=int, default=2)
    cli.add_argument("--modes", nargs="+", choices=("stream", "whole"), default=["stream", "whole"])
    cli.add_argument("--out", type=Path, default=ROOT / "results" / "request-path")
    options = cli.parse_args()
    options.out.parent.mkdir(parents=True, exist_ok=True)

    runs = {}  # (server, mode) -> bench.py's summary rows
    for label, env, app in _servers(options):
        runs.update(_measure(options, label, env, app))
    print(f"\noutput tok/s (streamed: TTFT p50 ms, TPOT p50 ms); pace {options.step_ms} ms + "
          f"{options.step_ms_per_seq} ms a sequence, {options.duration:g} s per level")
    print("| server | mode | " + " | ".join(f"c = {c}" for c in options.concurrency) + " |")
    print("| --- | --- |" + " --- |" * len(options.concurrency))
    for (label, mode), rows in runs.items():
        print(f"| {label} | {mode} | " + " | ".join(map(_cell, sorted(rows, key=lambda r: r["concurrency"]))) + " |")


def _cell(row: dict) -> str:
    tok_s = f"{row['output_tok_s']:,.0f}"
    return tok_s if row["ttft_ms_p50"] is None else f"{tok_s} ({row['ttft_ms_p50']:,.0f}, {row['tpot_ms_p50']:.1f})"


def _servers(options):
    """(label, environment, app) for each server to measure: paced engines in the workers, or paced vLLM cores."""
    from gunicorn_llm.engines.model_store import resolve_model
    from gunicorn_llm.engines.vllm_engine import EXECUTOR_ENV

    model = resolve_model(None)  # the embedded model: its tokenizer, its name and its shape; no weights are loaded
    common = {**os.environ, "MODEL_PATH": str(model), "THREADS": "4096", "MAX_WAITING": "4096",
              "STREAM_INTERVAL": str(options.stream_interval), "MAX_MODEL_LEN": "1024",
              STEP_MS_ENV: str(options.step_ms), PER_SEQ_MS_ENV: str(options.step_ms_per_seq),
              "GPU_IDS": "", "CUDA_VISIBLE_DEVICES": ""}
    if not options.frontends:
        yield (f"paced engine x {options.workers}",
               {**common, "INFER_TYPE": "transformers", "CPU_WORKERS": str(options.workers)},
               "scripts.bench_request_path:app")
        return
    for frontends in options.frontends:
        yield (f"vLLM, K = {frontends}",
               {**common, "INFER_TYPE": "vllm", "CPU_WORKERS": "1", "WORKERS_PER_GPU": str(frontends),
                "VLLM_ENGINE_CORE": "process", EXECUTOR_ENV: PACED_EXECUTOR},
               None)  # gunicorn_conf.py's vLLM app


def _measure(options, label: str, env: dict, app: str | None) -> dict:
    from benchkit.servers import ServerProcess, Servers, free_port
    from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME

    port = free_port()
    env = {**env, "PORT": str(port), "DISPATCHER_STATE": str(options.out.parent / f"request-path-slices-{port}.json")}
    workers = int(env.get("WORKERS_PER_GPU", env["CPU_WORKERS"]))
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn_conf.py", *([app] if app else [])]
    stem = f"{options.out}-{label.replace(' ', '').replace(',', '-').replace('=', '')}"
    runs = {}
    with Servers() as servers:
        server = servers.add(ServerProcess(command, port, Path(f"{stem}.log"), env, cwd=ROOT))
        server.wait_loaded(workers, timeout_s=900)
        for mode in options.modes:
            pace = [f"{c * 1000 / (options.step_ms + c * options.step_ms_per_seq):,.0f}"
                    for c in options.concurrency]
            print(f"{label}, {mode}: the pace's ceiling at concurrency {options.concurrency}: {', '.join(pace)} tok/s",
                  flush=True)
            result = Path(f"{stem}-{mode}.json")
            subprocess.run([sys.executable, str(ROOT / "bench.py"), "--url", f"paced={server.url}@completions",
                            "--tokenizer", env["MODEL_PATH"], "--model", EMBEDDED_MODEL_NAME, "--no-progress",
                            "--concurrency", *map(str, options.concurrency), "--duration", str(options.duration),
                            "--client-processes", str(options.client_processes), "--prompt-len", "16",
                            "--output-len", str(options.output_len),
                            "--stream" if mode == "stream" else "--no-stream",
                            "--json", str(result)], check=False)
            runs[(label, mode)] = json.loads(result.read_text())["summary"]
    return runs


if __name__ == "__main__":
    main()
