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
cProfile's top functions of each part.

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
    options = cli.parse_args()
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="probe-metrics-"))
    import torch

    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.engines.transformers_scoring import ScoreJob, score_jobs
    from gunicorn_llm.http.app import create_app
    from gunicorn_llm.settings import ServerSettings

    model_dir = Path(tempfile.mkdtemp(prefix="probe-scoring-")) / options.shape
    build_model(options.source, options.shape, model_dir)
    settings = ServerSettings(DTYPE=options.dtype)
    engine = TransformersEngine(str(model_dir), "probe", settings)
    load = make_load(engine.tokenizer, options.items, 0, seed=0)
    bodies = [loglikelihood_body(context, option) for context, opts in load.choices for option in opts]
    prompts = [engine.tokenizer(body["prompt"])["input_ids"] for body in bodies]

    forward_s = 0.0

    def forward_started(*_):
        nonlocal forward_s
        forward_s -= time.perf_counter()

    def forward_ended(*_):
        nonlocal forward_s
        forward_s += time.perf_counter()

    engine.model.register_forward_pre_hook(forward_started)
    engine.model.register_forward_hook(forward_ended)
    jobs = [ScoreJob([ids], 1, next_tokens=engine.scored_next_tokens) for ids in prompts]
    with _profiled(options.profile, "scoring"):
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
