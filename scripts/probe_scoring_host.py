"""Where a scoring request's host time goes on the transformers engine, in-process: the evaluation load's
log-likelihood requests (benchkit/eval_load.py) through the engine's scoring and through the HTTP layer, each timed
apart, in one thread.

On a GPU the model's compute is cheap and the worker's Python (one interpreter lock for the request threads and the
batching thread) bounds how many scoring requests a second it answers. With a model whose layers cost next to
nothing (`--shape tiny` of benchkit/models.py: the real vocabulary, 2 layers of width 64) this shows that cost on a
CPU:

- scoring: `score_jobs` over bursts of --burst requests (as the batching thread takes them), its forward passes
  timed apart by hooks; the rest is building the batches and turning logits into log-probabilities;
- HTTP: the `/v1/completions` route through Flask's test client (validation, tokenizing, the echoed logprobs object,
  JSON, metrics) over the same engine whose scoring answers from the results already computed, and the one-token
  answer after it (`max_tokens: 1`, answered from the scoring). Timed on a second round of the same requests: a
  long evaluation's steady state (the token texts remembered, Engine.token_texts).

Prints milliseconds per request for each (wall clock and this process's CPU time, all threads) and, with --profile,
cProfile's top functions of each part. On a GPU, --passes waits for the device around each forward pass and prints
the passes grouped by shape (rows, new tokens per row, cached tokens per row: how much of each is padding), and
--torch-profile prints the operators that took the device's time.

Usage: python scripts/probe_scoring_host.py CONFIG_AND_TOKENIZER_DIR [--shape tiny] [--items 64] [--burst 64]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit
from benchkit.eval_load import loglikelihood_body, make_load  # noqa: E402
from benchkit.models import add_model_arguments, build_model  # noqa: E402


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(cli)
    cli.set_defaults(shape="tiny")
    cli.add_argument("--items", type=int, default=64, help="multiple-choice items (4 requests each)")
    cli.add_argument("--burst", type=int, default=64, help="requests scored together")
    cli.add_argument("--dtype", default="bfloat16")
    cli.add_argument("--profile", action="store_true", help="print cProfile's top functions of each part")
    cli.add_argument("--passes", action="store_true", help="time each forward pass alone (device synchronised)")
    cli.add_argument("--torch-profile", action="store_true", help="print the top operators by device time")
    cli.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="the engine's, for its slots' cache")
    options = cli.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="probe-metrics-"))
    import torch

    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.engines.transformers_scoring import ScoreJob, score_jobs
    from gunicorn_llm.http.app import create_app
    from gunicorn_llm.settings import ServerSettings

    model_dir = Path(tempfile.mkdtemp(prefix="probe-scoring-")) / options.shape
    build_model(options.source, options.shape, model_dir)
    settings = ServerSettings(DTYPE=options.dtype, GPU_MEMORY_UTILIZATION=options.gpu_memory_utilization)
    engine = TransformersEngine(str(model_dir), "probe", settings)
    if torch.cuda.is_available():  # what the slots' cache left for scoring
        free, total = torch.cuda.mem_get_info()
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        print(f"GPU memory after loading: free {free / 2**30:.1f} GiB of {total / 2**30:.1f}, torch allocated "
              f"{allocated / 2**30:.1f} GiB, reserved {reserved / 2**30:.1f} GiB")
    load = make_load(engine.tokenizer, options.items, 0, seed=0)
    bodies = [loglikelihood_body(prompt_ids) for prompt_ids, _ in load.encoded]
    prompts = [body["prompt"] for body in bodies]

    forward_s = 0.0
    passes: list[tuple[int, int, int, float]] = []  # rows, new tokens per row, cached tokens per row, seconds
    synchronize = torch.cuda.synchronize if options.passes and torch.cuda.is_available() else lambda: None

    def forward_started(_model, _args, kwargs):
        nonlocal forward_s
        synchronize()
        cache = kwargs.get("past_key_values")
        passes.append((*kwargs["input_ids"].shape, 0 if cache is None else cache.get_seq_length(), time.perf_counter()))
        forward_s -= passes[-1][-1]

    def forward_ended(*_):
        nonlocal forward_s
        synchronize()
        forward_s += time.perf_counter()
        passes[-1] = (*passes[-1][:3], time.perf_counter() - passes[-1][3])

    engine.model.register_forward_pre_hook(forward_started, with_kwargs=True)
    engine.model.register_forward_hook(forward_ended)
    jobs = [ScoreJob([ids], 1, next_tokens=engine.scored_next_tokens) for ids in prompts]
    with _profiled(options.profile, "scoring"), _device_profiled(options.torch_profile):
        started, cpu_started = time.perf_counter(), time.process_time()
        for at in range(0, len(jobs), options.burst):
            score_jobs(engine.model, engine.tokenizer.pad_token_id, jobs[at : at + options.burst])
        scoring_s, scoring_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    scored = {tuple(ids): job.result.result()[0] for ids, job in zip(prompts, jobs, strict=True)}

    # the HTTP layer over the same engine, its scoring answered from the results above
    engine.prompt_logprobs = lambda prompts, top=0, deadline=None: [scored[tuple(ids)] for ids in prompts]
    client = create_app(lambda: engine, settings).test_client()
    while client.get("/ready").status_code != 200:
        time.sleep(0.01)
    for body in bodies:  # the first round: the token texts are remembered
        assert client.post("/v1/completions", json=body).status_code == 200
    with _profiled(options.profile, "HTTP"):
        started, cpu_started = time.perf_counter(), time.process_time()
        for body in bodies:
            answer = client.post("/v1/completions", json=body)
            assert answer.status_code == 200, answer.get_data(as_text=True)
        http_s, http_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started

    count = len(bodies)
    print(f"{count} requests ({options.items} items x 4 options), bursts of {options.burst}, "
          f"{sum(map(len, prompts)) / count:.0f} prompt tokens each on average, {options.shape} shape, "
          f"{options.dtype}, torch threads {torch.get_num_threads()}")
    print("| part | ms per request (wall) | ms per request (CPU) |\n| --- | --- | --- |")
    print(f"| scoring: all | {scoring_s / count * 1e3:.2f} | {scoring_cpu_s / count * 1e3:.2f} |")
    print(f"| scoring: forward passes | {forward_s / count * 1e3:.2f} | |")
    rest_ms = (scoring_s - forward_s) / count * 1e3
    print(f"| scoring: the rest (batches, log-probabilities from the logits) | {rest_ms:.2f} | |")
    print(f"| HTTP: the /v1/completions route (scoring answered from the above) | {http_s / count * 1e3:.2f} | "
          f"{http_cpu_s / count * 1e3:.2f} |")
    if options.passes:
        print_passes(passes)


def print_passes(passes: list[tuple[int, int, int, float]]) -> None:
    """The forward passes grouped by kind (over a cache or not) and size: how many, their time, and their shapes."""
    print("| passes | over a cache | rows (mean) | new tokens per row (mean) | cached per row (mean) | ms each (mean) "
          "| ms in all |\n| --- | --- | --- | --- | --- | --- | --- |")
    for cached in (False, True):
        group = [p for p in passes if bool(p[2]) == cached]
        if group:
            mean = [sum(p[k] for p in group) / len(group) for k in range(4)]
            print(f"| {len(group)} | {'yes' if cached else 'no'} | {mean[0]:.1f} | {mean[1]:.1f} | {mean[2]:.0f} | "
                  f"{mean[3] * 1e3:.1f} | {sum(p[3] for p in group) * 1e3:.0f} |")
    slowest = sorted(passes, key=lambda p: -p[3])[:8]
    print("slowest passes (rows, new tokens per row, cached per row, ms):",
          ", ".join(f"({r}, {w}, {c}, {s * 1e3:.1f})" for r, w, c, s in slowest))


class _device_profiled:
    """torch.profiler over the block when `on`, its top operators by device time (self) printed after it."""

    def __init__(self, on: bool):
        import torch.profiler

        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        self.profile = torch.profiler.profile(activities=activities) if on else None

    def __enter__(self):
        if self.profile:
            self.profile.__enter__()

    def __exit__(self, *exc):
        if self.profile:
            self.profile.__exit__(*exc)
            print(self.profile.key_averages().table(sort_by="self_device_time_total", row_limit=20))


class _profiled:
    """cProfile over the block when `on`, its top functions printed after it."""

    def __init__(self, on: bool, title: str):
        self.profile, self.title = (cProfile.Profile() if on else None), title

    def __enter__(self):
        if self.profile:
            self.profile.enable()

    def __exit__(self, *_):
        if self.profile:
            self.profile.disable()
            print(f"--- {self.title}: top functions by own time")
            pstats.Stats(self.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
