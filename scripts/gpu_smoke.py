"""GPU smoke run: the real launcher on a multi-GPU machine, with --per_proc_gpus 1 and then 2.

For each setting it starts start_gunicorn.sh with the transformers engine on a random-weight Llama model shaped
like the embedded SmolLM2-135M (machines without network cannot download a real one), waits until every worker
is ready, and prints what each worker sees (its CUDA_VISIBLE_DEVICES slice, torch's device count, where its layers
are), which processes nvidia-smi finds on which GPU, and the answers to concurrent /infer requests.

Usage: python3 scripts/gpu_smoke.py TOKENIZER_AND_CONFIG_DIR [PORT]
(the folder needs config.json and the tokenizer files; weights are drawn at random here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.request import Request, urlopen

ROOT = Path(__file__).resolve().parent.parent


def build_random_model(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)


def call(url: str, body: dict | None = None) -> tuple[dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=120) as response:
        return json.loads(response.read()), dict(response.headers)


def wait_ready(url: str, workers: int, process: subprocess.Popen, timeout_s: float = 300) -> dict[int, dict]:
    ready: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(ready) < workers:
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not get {workers} workers ready (exit {process.poll()})")
        try:
            answer, _ = call(f"{url}/ready")
            ready[answer["pid"]] = answer
        except OSError:
            time.sleep(0.3)
    return ready


def gpu_processes() -> str:
    return subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"],
        capture_output=True, text=True,
    ).stdout.strip()


def gpu_index_by_uuid() -> dict[str, str]:
    listing = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout
    return {uuid.strip(): index.strip() for index, uuid in (line.split(",") for line in listing.splitlines())}


def throughput(url: str, concurrency: int, new_tokens: int) -> str:
    """Output tokens/s of `concurrency` simultaneous greedy requests of `new_tokens` tokens each (EOS ignored)."""
    body = {"params": {"temperature": 0, "max_tokens": new_tokens, "ignore_eos": True}}
    call(f"{url}/infer", {"instances": ["warm-up"], **body})
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: call(f"{url}/infer", {"instances": [f"Request {i} about GPUs"], **body}),
                      range(concurrency)))
    elapsed = time.perf_counter() - started
    return f"{concurrency} concurrent requests x {new_tokens} tokens: {concurrency * new_tokens / elapsed:.0f} output tok/s"


def run(model: Path, per_proc_gpus: int, gpu_count: int, port: int, batching: str = "auto") -> list[str]:
    url = f"http://127.0.0.1:{port}"
    workers = gpu_count // per_proc_gpus
    log = open(f"/tmp/gpu-smoke-{per_proc_gpus}-{batching}.log", "w")
    command = [str(ROOT / "start_gunicorn.sh"), "--model_name", str(model), "--per_proc_gpus", str(per_proc_gpus),
               "--infer_type", "transformers", "--port", str(port), "--batching", batching]
    print("$", " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    lines = [f"### --per_proc_gpus {per_proc_gpus} --batching {batching}: {workers} workers", "",
             "$ " + " ".join(command), ""]
    try:
        ready = wait_ready(url, workers, process)
        lines += ["| worker pid | slice (CUDA_VISIBLE_DEVICES) | torch.cuda.device_count() | layers on | batching | GPU |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for pid, answer in sorted(ready.items()):
            lines.append(f"| {pid} | {answer['slice']} | {answer['visible_gpus']} | {','.join(answer['layers_on'])} "
                         f"| {answer['batching']} | {answer['gpu_names'][0] if answer['gpu_names'] else '-'} |")
        by_uuid = gpu_index_by_uuid()
        lines += ["", "nvidia-smi compute processes (pid, GPU index, memory):", "```"]
        for row in gpu_processes().splitlines():
            pid, uuid, memory = (field.strip() for field in row.split(","))
            lines.append(f"{pid}  GPU {by_uuid.get(uuid, uuid)}  {memory}")
        lines += ["```", ""]
        prompts = [f"Request {i}: tell me about GPUs" for i in range(4 * workers)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(
                lambda p: call(f"{url}/infer", {"instances": [p], "params": {"temperature": 0, "max_tokens": 16}}),
                prompts,
            ))
        served: dict[str, int] = {}
        for answer, headers in results:
            assert isinstance(answer, list) and isinstance(answer[0], str)
            key = f"pid {headers['X-Worker-Pid']} slice {headers['X-GPU-Slice']}"
            served[key] = served.get(key, 0) + 1
        lines.append(f"{len(results)} concurrent /infer requests, all answered with text: "
                     + "; ".join(f"{k}: {v}" for k, v in sorted(served.items())))
        lines.append("")
        if per_proc_gpus == 1:  # a first look at the two batching paths; full benchmarks are a separate script
            lines += [f"Throughput over all {workers} workers: " + throughput(url, 64 * workers, 128), ""]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
        log.close()
    return lines


def main() -> None:
    import torch

    source = Path(sys.argv[1])
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 5002
    # Counted through nvidia-smi: this script stays off the GPUs, so nvidia-smi's process list shows only workers.
    gpu_count = len(gpu_index_by_uuid())
    name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.splitlines()[0]
    report = [f"GPUs: {gpu_count} x {name}; torch {torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "random-smollm2-135m"
        build_random_model(source, model)
        report += run(model, 1, gpu_count, port)  # auto: continuous batching on GPU
        report += run(model, 1, gpu_count, port, batching="generate")
        report += run(model, 2, gpu_count, port)
    print("\n".join(report))


if __name__ == "__main__":
    main()
