"""bench.py, the benchmark client (its code in benchkit/), end to end against a real server (transformers engine,
1 CPU worker).

One run drives the same server through all four protocols as four "servers" (`/infer`, `/generate`,
`/v1/completions`, `/v1/chat/completions`), interleaved, so that every request path and the ratios are exercised at
once; the JSON and the plot it writes are checked. It uses the fixed prompt: its greedy answer re-tokenizes to the
tokens generated, so the native routes' text counts are exact too (on arbitrary text they can be a token off). A
second run pairs the live server (random prompts, usage counts) with a URL where nothing listens: failures counted,
the cause named, exit status 1.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import bench
from benchkit import stats
from benchkit.client import Server
from benchkit.prompts import PromptMaker, load_tokenizer
from conftest import ROOT, free_port

PROMPT_LEN, OUTPUT_LEN, REQUESTS, LEVELS = 16, 8, 4, (1, 4)
PROTOCOLS = ("infer", "generate", "completions", "chat")

pytestmark = pytest.mark.timeout(300)


def run_bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--prompt-len", str(PROMPT_LEN), "--output-len", str(OUTPUT_LEN),
         "--requests-per-level", str(REQUESTS), "--warmup", "1", *args],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "1")
    server.wait_until_ready(workers=1)
    return server


@pytest.fixture(scope="module")
def every_protocol(server, tmp_path_factory):
    """One interleaved run over the four protocols of the same server; (process, JSON document, plot path)."""
    out = tmp_path_factory.mktemp("bench")
    urls = [arg for protocol in PROTOCOLS for arg in ("--url", f"{protocol}={server.url}@{protocol}")]
    process = run_bench(*urls, "--concurrency", *map(str, LEVELS), "--prompts", "fixed",
                        "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"))
    assert process.returncode == 0, process.stdout + process.stderr
    return process, json.loads((out / "bench.json").read_text()), out / "bench.png"


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("level", LEVELS)
def test_every_request_is_measured(server, every_protocol, protocol, level):
    _, document, _ = every_protocol
    [summary] = [s for s in document["summary"] if s["server"] == protocol and s["concurrency"] == level]
    requests = REQUESTS
    assert summary["requests"] == requests and summary["failures"] == 0, summary["errors"]
    # Which worker answered, from X-Worker-Pid: the server's one worker, every time.
    assert summary["per_worker"] == {str(pid): requests for pid in server.worker_pids()}
    # Exactly the asked-for output length: from usage on the OpenAI routes, re-tokenized text on the native ones.
    assert summary["output_tokens"] == requests * OUTPUT_LEN
    assert summary["wrong_output_len"] == 0
    assert summary["output_counted_from"] == ("text" if protocol in ("infer", "generate") else "usage")
    if protocol == "completions":  # usage's prompt count: the prompts have exactly --prompt-len tokens
        assert summary["input_tokens"] == requests * PROMPT_LEN
    elif protocol == "chat":  # the chat template adds its tokens
        assert summary["input_tokens"] > requests * PROMPT_LEN
    for name in stats.LATENCIES:
        for p in stats.PERCENTILES:
            assert summary[f"{name}_ms_p{p}"] > 0, name
    for p in stats.PERCENTILES:
        assert summary[f"ttft_ms_p{p}"] <= summary[f"e2e_ms_p{p}"]
        assert summary[f"tpot_ms_p{p}"] < summary[f"e2e_ms_p{p}"]
    assert summary["output_tok_s"] > 0
    assert summary["total_tok_s"] > summary["output_tok_s"]
    assert summary["req_s"] == pytest.approx(summary["output_tok_s"] / OUTPUT_LEN, rel=0.01)


def test_ratios_compare_with_the_first_server(every_protocol):
    process, document, _ = every_protocol
    assert sorted((r["server"], r["concurrency"]) for r in document["runs"]) == sorted(
        (p, c) for p in PROTOCOLS for c in LEVELS)
    ratios = document["ratios"]
    assert {(r["server"], r["baseline"], r["concurrency"]) for r in ratios} == {
        (p, "infer", c) for p in PROTOCOLS[1:] for c in LEVELS}
    assert all(row[key] > 0 for row in ratios for key in stats.RATIO_METRICS)
    assert "ratio (server / baseline" in process.stdout
    assert "TTFT ms p50/90/99" in process.stdout
    assert "generate / infer" in process.stdout


def test_plot_is_written_when_matplotlib_is_installed(every_protocol):
    process, _, plot = every_protocol
    if importlib.util.find_spec("matplotlib") is None:
        assert "no plot: matplotlib is not installed" in process.stdout
    else:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_server_not_listening_counts_failures_and_exits_1(server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    process = run_bench("--url", f"live={server.url}@completions", "--url", f"dead={dead}@infer",
                        "--concurrency", "2", "--json", str(tmp_path / "bench.json"), "--no-progress")
    assert process.returncode == 1, process.stdout + process.stderr
    assert f"error: dead c=2: {REQUESTS} of {REQUESTS} requests failed" in process.stdout
    assert "Connection refused" in process.stdout
    live, dead = json.loads((tmp_path / "bench.json").read_text())["summary"]
    assert dead["failures"] == REQUESTS and dead["output_tokens"] == 0
    # Random prompts: exact lengths both ways by the server's own count.
    assert live["failures"] == 0 and live["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert live["input_tokens"] == REQUESTS * PROMPT_LEN


def test_client_processes_share_the_clients(server, tmp_path):
    process = run_bench("--url", f"live={server.url}@completions", "--concurrency", "2", "--client-processes", "2",
                        "--json", str(tmp_path / "bench.json"), "--no-progress")
    assert process.returncode == 0, process.stdout + process.stderr
    [summary] = json.loads((tmp_path / "bench.json").read_text())["summary"]
    assert summary["client_processes"] == 2  # each request records the process that sent it
    assert summary["requests"] == REQUESTS and summary["failures"] == 0
    assert summary["output_tokens"] == REQUESTS * OUTPUT_LEN
    assert summary["client_cpu_pct"] > 0


def test_interleaved_runs_alternate_which_server_goes_first():
    a, b = Server("a", "http://a", "infer"), Server("b", "http://b", "infer")
    order = [(s.name, level, repeat) for s, level, repeat in bench.schedule([a, b], [1, 4], 2, interleave=True)]
    assert order == [("a", 1, 0), ("b", 1, 0), ("b", 1, 1), ("a", 1, 1),
                     ("a", 4, 0), ("b", 4, 0), ("b", 4, 1), ("a", 4, 1)]
    order = [(s.name, level) for s, level, _ in bench.schedule([a, b], [1, 4], 1, interleave=True)]
    assert order == [("a", 1), ("b", 1), ("b", 4), ("a", 4)]
    assert [s.name for s, _, _ in bench.schedule([a, b], [1, 4], 2, interleave=False)] == ["a"] * 4 + ["b"] * 4


def test_repeats_combine_into_medians_and_sums():
    runs = [{"requests": 4, "failures": 0, "output_tok_s": v, "ttft_ms_p50": v, "output_len_min": v,
             "output_counted_from": source, "errors": {}, "per_worker": {"7": v}}
            for v, source in ((1, "usage"), (5, "text"), (3, "usage"))]
    combined = stats.combine_repeats(runs)
    assert combined["requests"] == 12 and combined["output_tok_s"] == 3 and combined["ttft_ms_p50"] == 3
    assert combined["output_len_min"] == 1 and combined["output_counted_from"] == "text/usage"
    assert combined["per_worker"] == {"7": 9}  # summed over the repeats


@pytest.mark.parametrize("kind", ["random", "fixed"])
@pytest.mark.parametrize("length", [1, 16, 128])
def test_prompts_have_the_exact_token_length(embedded_model_dir, kind, length):
    tokenizer = load_tokenizer(str(embedded_model_dir))
    prompts = PromptMaker(tokenizer, length, kind).make(20, "seed")
    assert {len(tokenizer(prompt)["input_ids"]) for prompt in prompts} == {length}
    assert len(set(prompts)) == (20 if kind == "random" else 1)


def test_url_syntax():
    assert bench.parse_server("http://h:1", 0, "infer") == Server("h:1", "http://h:1", "infer")
    assert bench.parse_server("ours=http://h:1/@chat", 0, "infer") == Server("ours", "http://h:1", "chat")
    with pytest.raises(SystemExit):
        bench.parse_server("h:1", 0, "infer")
