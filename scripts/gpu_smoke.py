"""GPU smoke run: the real launcher on a multi-GPU machine, with --per_proc_gpus 1 and then 2.

For each setting it starts start_gunicorn.sh with the transformers engine on a random-weight Llama model shaped
like the embedded SmolLM2-135M (machines without network cannot download a real one), waits until every worker
is ready, and prints what each worker sees (its CUDA_VISIBLE_DEVICES slice, torch's device count, where its layers
are), which processes nvidia-smi finds on which GPU, and the answers to concurrent /infer requests.

Usage: python3 scripts/gpu_smoke.py TOKENIZER_AND_CONFIG_DIR [PORT]
(the folder needs config.json and the tokenizer files; weights are drawn at random here).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import Request, urlopen

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit
from benchkit.load import send_all  # noqa: E402
from benchkit.models import build_model  # noqa: E402
from benchkit.servers import ServerProcess, Servers  # noqa: E402


def call(url: str, body: dict | None = None) -> tuple[dict, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = Request(url, data=data, headers={"Content-Type": "application/json"})
    with urlopen(request, timeout=120) as response:
        return json.loads(response.read()), dict(response.headers)


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
    send_all(lambda _client, i: call(f"{url}/infer", {"instances": [f"Request {i} about GPUs"], **body}),
             range(concurrency), concurrency)
    elapsed = time.perf_counter() - started
    rate = concurrency * new_tokens / elapsed
    return f"{concurrency} concurrent requests x {new_tokens} tokens: {rate:.0f} output tok/s"


def run(model: Path, per_proc_gpus: int, gpu_count: int, port: int, batching: str = "auto") -> list[str]:
    workers = gpu_count // per_proc_gpus
    log = Path(tempfile.gettempdir()) / f"gpu-smoke-{per_proc_gpus}-{batching}.log"
    with Servers() as servers:
        server = servers.add(ServerProcess.launch(["--model_name", str(model), "--per_proc_gpus", str(per_proc_gpus),
                                                   "--infer_type", "transformers", "--batching", batching], log,
                                                  port=port))
        url = server.url
        lines = [f"### --per_proc_gpus {per_proc_gpus} --batching {batching}: {workers} workers", "",
                 "$ " + " ".join(server.command), ""]
        ready = server.ready_workers(workers, timeout_s=300)
        lines += ["| worker pid | slice (CUDA_VISIBLE_DEVICES) | torch.cuda.device_count() | layers on | batching "
                  "| GPU |",
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
        results = send_all(
            lambda _client, p: call(f"{url}/infer", {"instances": [p], "params": {"temperature": 0, "max_tokens": 16}}),
            prompts, len(prompts))
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
    return lines


def main() -> None:
    import torch

    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("source", type=Path, help="folder with the config.json and tokenizer files the model copies")
    cli.add_argument("port", type=int, nargs="?", default=5002)
    options = cli.parse_args()
    # Counted through nvidia-smi: this script stays off the GPUs, so nvidia-smi's process list shows only workers.
    gpu_count = len(gpu_index_by_uuid())
    name = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.splitlines()[0]
    report = [f"GPUs: {gpu_count} x {name}; torch {torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "random-smollm2-135m"
        build_model(options.source, "135m", model, keep_eos=True)
        report += run(model, 1, gpu_count, options.port)  # auto: continuous batching on GPU
        report += run(model, 1, gpu_count, options.port, batching="generate")
        report += run(model, 2, gpu_count, options.port)
    print("\n".join(report))


if __name__ == "__main__":
    main()
