"""Soak run: N minutes of concurrent requests against a real server; each worker's memory and every request counted.

Starts the server through the launcher (transformers engine on CPU by default), runs `--concurrency` client
threads that send short /v1/completions requests back to back for `--minutes`, samples each worker's resident
memory every `--sample-s` seconds, and reports: requests answered, failed and timed out (a timeout is a hang: the
client gives up after `--client-timeout-s`), throughput, and per worker the memory at the first and last sample
after warm-up and the largest in between. Writes the report into docs/soak.md.

Usage: python scripts/soak.py [--minutes 5] [--concurrency 64] [--workers 2] [--infer-type transformers]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit
from benchkit.load import Clients  # noqa: E402
from benchkit.servers import ServerProcess, Servers  # noqa: E402

DOC = ROOT / "docs" / "soak.md"


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--minutes", type=float, default=5)
    cli.add_argument("--concurrency", type=int, default=64)
    cli.add_argument("--workers", type=int, default=2)
    cli.add_argument("--infer-type", default="transformers")
    cli.add_argument("--max-tokens", type=int, default=16)
    cli.add_argument("--sample-s", type=float, default=10)
    cli.add_argument("--client-timeout-s", type=float, default=300)
    options = cli.parse_args()

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with Servers(stop_wait_s=120) as servers:  # however the run ends (a SIGTERM too), the server is stopped
        server = servers.add(ServerProcess.launch(
            ["--infer_type", options.infer_type, "--cpu-workers", str(options.workers),
             "--max-waiting", str(options.concurrency)], Path(tempfile.gettempdir()) / "soak-server.log", env))
        server.wait_loaded(options.workers, timeout_s=600)
        report = soak(server, options)
    print(report)
    DOC.write_text(report + "\n")


def soak(server: ServerProcess, options) -> str:
    sessions = [requests.Session() for _ in range(options.concurrency)]  # one kept-alive connection per client

    def request(client: int, _n: int) -> tuple[str, int]:
        """(outcome, tokens generated) of one request."""
        body = {"prompt": f"Client {client} asks: tell me something about the number {client}.",
                "max_tokens": options.max_tokens, "ignore_eos": True, "temperature": 0.7}
        try:
            response = sessions[client].post(f"{server.url}/v1/completions", json=body,
                                             timeout=options.client_timeout_s)
            return str(response.status_code), response.json()["usage"]["completion_tokens"] if response.ok else 0
        except requests.Timeout:
            return "timeout", 0
        except requests.RequestException as error:
            return type(error).__name__, 0

    started = time.monotonic()
    clients = Clients(request, options.concurrency, duration_s=options.minutes * 60).start()
    memory: dict[int, list[float]] = {}
    while time.monotonic() < clients.deadline:
        for worker in psutil.Process(server.process.pid).children():
            memory.setdefault(worker.pid, []).append(worker.memory_info().rss / 2**20)
        time.sleep(options.sample_s)
    sent = clients.join(timeout_s=options.client_timeout_s + 10)
    hung = clients.alive()
    elapsed = time.monotonic() - started
    outcomes = Counter(one.result[0] for one in sent)
    return render(options, outcomes, sum(one.result[1] for one in sent), elapsed, memory, hung)


def render(options, outcomes: Counter, tokens: int, elapsed: float, memory: dict[int, list[float]], hung: int) -> str:
    answered = outcomes.get("200", 0)
    lines = [
        "# Soak run",
        "",
        f"{date.today().isoformat()}, this machine (2 cores, no GPU): `python scripts/soak.py --minutes "
        f"{options.minutes:g} --concurrency {options.concurrency} --workers {options.workers} --infer-type "
        f"{options.infer_type}`; each request {options.max_tokens} tokens (EOS ignored), sampling at temperature 0.7.",
        "",
        f"- requests: {sum(outcomes.values())} sent, {answered} answered with 200; outcomes {dict(outcomes)}",
        f"- client threads still waiting at the end (hung): {hung}",
        f"- generated {tokens} tokens in {elapsed:.0f} s: {tokens / elapsed:.1f} tok/s, {answered / elapsed:.2f} req/s",
        "",
        "| worker pid | samples | RSS after warm-up (MiB) | RSS at the end (MiB) | largest (MiB) | change |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for pid, samples in sorted(memory.items()):
        settled = samples[1:] or samples  # the first sample can precede the first batch's allocations
        change = (settled[-1] - settled[0]) / settled[0] * 100
        lines.append(f"| {pid} | {len(samples)} | {settled[0]:.0f} | {settled[-1]:.0f} | {max(settled):.0f} "
                     f"| {change:+.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
