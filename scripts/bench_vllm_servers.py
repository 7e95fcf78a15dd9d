"""This server's vLLM backend side by side with vLLM's own OpenAI server: output tok/s, TTFT and TPOT.

Both servers run the same model with the same engine flags (dtype, max model length, eager mode, KV cache size)
and are measured by the same client, vLLM's serving benchmark (`vllm.benchmarks.serve`), over the streaming
`/v1/completions` protocol with random prompts and a fixed output length (EOS ignored). Runs are interleaved:
for each repetition and concurrency, one run against each server, so drift on a noisy machine hits both alike.
The table (median of the repetitions) is printed and written into docs/benchmarks.md between markers.

Usage: python scripts/bench_vllm_servers.py [--repeats 3] [--concurrency 1 4 16] [--output-len 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit, gunicorn_llm
from benchkit.servers import ServerProcess, Servers, free_port  # noqa: E402
from gunicorn_llm.engines.model_store import EMBEDDED_MODEL_NAME, embedded_model_dir  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- vllm-servers:begin -->", "<!-- vllm-servers:end -->"
MAX_MODEL_LEN = "2048"
OURS, THEIRS = "this server (vLLM backend)", "vLLM OpenAI server"
DTYPE = "float32"  # this server's CPU default (see docs/benchmarks.md); vLLM's server is given the same


def start_servers(servers: Servers, model: Path, log_dir: Path) -> dict[str, str]:
    """Both servers, started together; name -> URL once each is ready."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    engine = ["--max-model-len", MAX_MODEL_LEN, "--dtype", DTYPE, "--enforce-eager"]
    ours = servers.add(ServerProcess.launch(["--infer_type", "vllm", "--cpu-workers", "1", *engine],
                                            log_dir / "ours.log", env))
    port = free_port()
    theirs = servers.add(ServerProcess(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--served-model-name", EMBEDDED_MODEL_NAME, "--port", str(port), "--host", "127.0.0.1", *engine],
        port, log_dir / "theirs.log", env))
    ours.wait_loaded(None, timeout_s=600)  # until its worker has loaded
    theirs.wait_loaded(0, timeout_s=600)
    return {OURS: ours.url, THEIRS: theirs.url}


def measure(url: str, model: Path, concurrency: int, output_len: int, input_len: int, result_dir: Path) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", EMBEDDED_MODEL_NAME, "--served-model-name", EMBEDDED_MODEL_NAME, "--tokenizer", str(model),
        "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
        "--num-prompts", str(max(4, 2 * concurrency)), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--num-warmups", "1", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--save-result", "--result-dir", str(result_dir), "--result-filename", f"run-{time.time_ns()}.json",
    ])
    result = main(args)
    if result.get("failed"):
        raise SystemExit(f"{result['failed']} requests failed against {url}")
    return result


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--repeats", type=int, default=3)
    cli.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    cli.add_argument("--input-len", type=int, default=128)
    cli.add_argument("--output-len", type=int, default=32)
    cli.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench-vllm-servers")
    options = cli.parse_args()
    options.work_dir.mkdir(parents=True, exist_ok=True)

    model = embedded_model_dir()
    runs: dict[tuple[str, int], list[dict]] = {}
    with Servers(stop_wait_s=120) as servers:
        urls = start_servers(servers, model, options.work_dir)
        for repeat in range(options.repeats):
            for concurrency in options.concurrency:
                for name, url in urls.items():  # interleaved: each pair measured back to back
                    result = measure(url, model, concurrency, options.output_len, options.input_len, options.work_dir)
                    runs.setdefault((name, concurrency), []).append(result)
                    print(f"[{repeat + 1}/{options.repeats}] c={concurrency} {name}: "
                          f"{result['output_throughput']:.1f} tok/s", flush=True)

    table = render(runs, options)
    print(table)
    write_doc(table)
    (options.work_dir / "runs.json").write_text(json.dumps({f"{k[0]}|c={k[1]}": v for k, v in runs.items()},
                                                           default=str))


def render(runs: dict[tuple[str, int], list[dict]], options) -> str:
    names = [OURS, THEIRS]
    lines = [
        "| concurrency | server | output tok/s | median TTFT (ms) | median TPOT (ms) | ratio (this / vLLM) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for concurrency in options.concurrency:
        medians = {}
        for name in names:
            results = runs[(name, concurrency)]
            medians[name] = {key: statistics.median(r[key] for r in results)
                             for key in ("output_throughput", "median_ttft_ms", "median_tpot_ms")}
        ours, theirs = medians[OURS], medians[THEIRS]
        for name in names:
            m = medians[name]
            ratio = f"{ours['output_throughput'] / theirs['output_throughput']:.2f}" if name == OURS else ""
            lines.append(f"| {concurrency} | {name} | {m['output_throughput']:.1f} | {m['median_ttft_ms']:.0f} "
                         f"| {m['median_tpot_ms']:.0f} | {ratio} |")
    lines.append("")
    lines.append(f"Median of {options.repeats} interleaved runs; {options.input_len} prompt tokens (random), "
                 f"{options.output_len} output tokens (EOS ignored), 2 x concurrency prompts per run (at least 4), "
                 f"one warm-up request; dtype {DTYPE}, max model length {MAX_MODEL_LEN}, eager mode, 2 GiB KV cache.")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
