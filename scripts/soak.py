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
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from server_processes import free_port, wait_ready  # noqa: E402

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

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(ROOT / "start_gunicorn.sh"), "--infer_type", options.infer_type, "--cpu-workers",
               str(options.workers), "--port", str(port), "--max-waiting", str(options.concurrency)]
    print("$", " ".join(command), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped from outside: still stop the server
    log = open("/tmp/soak-server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    try:
        wait_ready(url, options.workers, server, timeout_s=600)
        report = soak(url, server, options)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)
    print(report)
    DOC.write_text(report + "\n")


def soak(url: str, server: subprocess.Popen, options) -> str:
    outcomes: Counter = Counter()
    tokens = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + options.minutes * 60

    def client(index: int) -> None:
        session = requests.Session()
        body = {"prompt": f"Client {index} asks: tell me something about the number {index}.",
                "max_tokens": options.max_tokens, "ignore_eos": True, "temperature": 0.7}
        while time.monotonic() < stop_at:
            try:
                response = session.post(f"{url}/v1/completions", json=body, timeout=options.client_timeout_s)
                outcome = str(response.status_code)
                generated = response.json()["usage"]["completion_tokens"] if response.ok else 0
            except requests.Timeout:
                outcome, generated = "timeout", 0
            except requests.RequestException as error:
                outcome, generated = type(error).__name__, 0
            with lock:
                outcomes[outcome] += 1
                tokens[0] += generated

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(options.concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    memory: dict[int, list[float]] = {}
    while time.monotonic() < stop_at:
        for worker in psutil.Process(server.pid).children():
            memory.setdefault(worker.pid, []).append(worker.memory_info().rss / 2**20)
        time.sleep(options.sample_s)
    for thread in threads:
        thread.join(timeout=options.client_timeout_s + 10)
    hung = sum(thread.is_alive() for thread in threads)
    elapsed = time.monotonic() - started
    return render(options, outcomes, tokens[0], elapsed, memory, hung)


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
