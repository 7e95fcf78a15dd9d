"""The vLLM engine on a GPU machine: vLLM's in-process ceiling, correctness, and no orphaned engine processes.

  ceiling MODEL_DIR       vLLM in-process (`LLM.generate`) on N prompts of P random tokens at once, O new tokens
                          each (greedy, EOS ignored): output tok/s, the figure a server on the same GPU aims at.
  correctness SOURCE_DIR  a random-weight model of the embedded model's shape, served in float32 by this server's
                          vLLM engine and its transformers engine: greedy texts compared, the vLLM engine's prompt
                          log-probabilities against a direct transformers forward pass, and a seeded sampled
                          request repeated alone and among others.
  parallel MODEL_DIR      tensor parallel against one GPU per worker on the same weights, in float32: the greedy
                          texts and prompt log-probabilities of a `--per_proc_gpus 2` server against a
                          `--per_proc_gpus 1` one's (both servers up at once, so the GPUs must hold both).
  orphans MODEL_DIR       this server (vLLM engine, its engine core in a process of its own; --per-proc-gpus 2:
                          tensor parallel) under load: kill -9 of the worker, HUP, SIGTERM, and kill -9 of the
                          master; nvidia-smi's compute processes before and after each. Where the slice's front ends
                          share one engine core (--workers-per-gpu above 1, the one-GPU default): kill -9 of one
                          front end (the others go on, a replacement attaches without loading), kill -9 of the
                          engine core (the supervisor launches another), HUP, SIGTERM, kill -9 of the master.
  orphans-master MODEL_DIR  only the last of those: kill -9 of the master under load.

Usage: python3 scripts/gpu_vllm_checks.py ceiling|correctness|parallel|orphans|orphans-master DIR \
           [--gpu-memory-utilization 0.4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: benchkit, gunicorn_llm
from benchkit.fault_load import Load  # noqa: E402
from benchkit.models import build_model  # noqa: E402
from benchkit.servers import ServerProcess, Servers, free_port, launcher_command  # noqa: E402

STOP_WAIT_S = 120  # a vLLM engine on GPUs may take a while to stop gracefully
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Question: what is 7 times 8?\nAnswer:", "The quick brown fox", "import numpy as np\n", "Dear Sir,"]


def ceiling(model: Path, options) -> None:
    import numpy
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), max_model_len=options.max_model_len,
              gpu_memory_utilization=options.gpu_memory_utilization, seed=0)
    vocab = llm.get_tokenizer().vocab_size
    rng = numpy.random.default_rng(0)
    params = SamplingParams(temperature=0, max_tokens=options.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 8, params, use_tqdm=False)  # warm-up
    for count in options.requests:
        prompts = [{"prompt_token_ids": rng.integers(100, vocab - 100, options.prompt_len).tolist()}
                   for _ in range(count)]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"| vLLM in-process LLM.generate | {count} x {options.prompt_len}/{options.output_len} | "
              f"{tokens / elapsed:,.0f} output tok/s | {elapsed:.2f} s |", flush=True)


class Server(ServerProcess):
    """This server on `model` through its launcher, with a dispatcher state of its own."""

    def __init__(self, model: Path, *args: str, log: Path):
        port = free_port()
        env = {**os.environ, "DISPATCHER_STATE": str(Path(tempfile.mkdtemp()) / "slices.json")}
        super().__init__(launcher_command(port, ["--model_name", str(model), *args]), port, log, env)

    def ready(self, timeout_s: float = 600) -> dict:
        """A ready worker's /ready, once every worker has loaded."""
        self.wait_loaded(None, timeout_s)
        answer = requests.get(f"{self.url}/ready", timeout=5)
        answer.raise_for_status()
        return answer.json()

    def post(self, path: str, body: dict) -> dict:
        answer = requests.post(f"{self.url}{path}", json=body, timeout=300)
        answer.raise_for_status()
        return answer.json()


def start_after_ready(servers: Servers, model: Path, *args: str, log: Path) -> Server:
    """Servers started one after another, each once the ones before are ready: a vLLM engine sizing its cache
    fails when another process frees GPU memory meanwhile."""
    for server in servers.started:
        server.ready()
    return servers.add(Server(model, *args, log=log))


def correctness(source: Path, options) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = Path(tempfile.mkdtemp()) / "random-smollm2-135m"
    build_model(source, "135m", model)
    common = ["--dtype", "float32", "--max-model-len", "1024", "--gpu-memory-utilization",
              str(options.gpu_memory_utilization), "--enforce-eager"]
    with Servers(STOP_WAIT_S) as servers:
        vllm = start_after_ready(servers, model, "--infer_type", "vllm", *common,
                                 log=options.out / "correctness-vllm.log")
        hf = start_after_ready(servers, model, "--infer_type", "transformers", *common,
                               log=options.out / "correctness-transformers.log")
        print("vLLM engine:", vllm.ready(), "\ntransformers engine:", hf.ready(), flush=True)
        compare_greedy(vllm, hf, "the engines")

        tokenizer = AutoTokenizer.from_pretrained(model)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
        worst = 0.0
        scores = vllm.post("/infer", {"instances": PROMPTS, "params": {"prompt_logprobs": 0, "max_tokens": 1}})
        for prompt, row in zip(PROMPTS, scores, strict=True):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            with torch.inference_mode():
                logits = reference(ids).logits.float()
            direct = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()
            worst = max(worst, (direct - torch.tensor(row)).abs().max().item())
        print(f"prompt log-probabilities, vLLM engine vs a direct float32 forward pass: max |difference| "
              f"{worst:.2e} nats over {len(PROMPTS)} prompts")

        seeded = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 1.0, "seed": 1234}
        alone = [vllm.post("/v1/completions", seeded)["choices"][0]["text"] for _ in range(2)]
        with ThreadPoolExecutor(9) as pool:
            others = [pool.submit(vllm.post, "/v1/completions", {**seeded, "seed": i}) for i in range(8)]
            among = pool.submit(vllm.post, "/v1/completions", seeded).result()["choices"][0]["text"]
            [other.result() for other in others]
        print(f"seed 1234, temperature 1: the same text twice alone: {alone[0] == alone[1]}; "
              f"the same among 8 other requests: {among == alone[0]}")


GREEDY = {"temperature": 0, "max_tokens": 32, "ignore_eos": True, "skip_special_tokens": False}


def compare_greedy(one: Server, other: Server, between: str) -> None:
    ours, theirs = (server.post("/infer", {"instances": PROMPTS, "params": GREEDY}) for server in (one, other))
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"greedy, 32 tokens, float32: {equal}/{len(PROMPTS)} texts equal between {between}", flush=True)
    for prompt, a, b in zip(PROMPTS, ours, theirs, strict=True):
        if a != b:
            common_prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            print(f"  differ after {common_prefix} characters: {prompt!r}: {a!r} vs {b!r}")


def parallel(model: Path, options) -> None:
    common = ["--infer_type", "vllm", "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
              "--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    with Servers(STOP_WAIT_S) as servers:
        split = start_after_ready(servers, model, *common, "--per_proc_gpus", "2", log=options.out / "parallel-tp.log")
        whole = start_after_ready(servers, model, *common, "--per_proc_gpus", "1",
                                  log=options.out / "parallel-one-gpu.log")
        print("tensor parallel:", split.ready(), "\none GPU per worker:", whole.ready(), flush=True)
        show("both loaded")
        compare_greedy(split, whole, "tensor parallel over 2 GPUs and one GPU")
        scoring = {"instances": PROMPTS, "params": {"prompt_logprobs": 0, "max_tokens": 1}}
        rows = zip(split.post("/infer", scoring), whole.post("/infer", scoring), strict=True)
        worst = max(abs(a - b) for tp_row, one_row in rows for a, b in zip(tp_row, one_row, strict=True))
        print(f"prompt log-probabilities, tensor parallel vs one GPU: max |difference| {worst:.2e} nats over "
              f"{len(PROMPTS)} prompts", flush=True)


def gpu_processes() -> list[tuple[int, int]]:
    """(pid, MiB) of every compute process nvidia-smi sees (none without nvidia-smi: a dry run on CPU)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [(int(pid), int(mib)) for pid, mib in (line.split(", ") for line in out.strip().splitlines() if line)]


def show(what: str) -> list[tuple[int, int]]:
    processes = gpu_processes()
    if not shutil.which("nvidia-smi"):
        print(f"{what}: no nvidia-smi here", flush=True)
        return processes
    used = " / ".join(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.splitlines())
    print(f"{what}: nvidia-smi compute processes {processes or 'none'}; GPU memory used {used}", flush=True)
    return processes


def under_load(url: str, clients: int) -> Load:
    """`clients` threads asking for completions of 64 tokens (EOS ignored) until stopped."""
    return Load(url, clients=clients, route="/v1/completions", max_tokens=64, timeout_s=60, max_s=3600,
                model=None).start()


def counts(load: Load, signalled_at: float | None = None) -> dict:
    """Stop the load; its requests answered and not. With `signalled_at` (time.monotonic() of a signal that stops
    the server), the requests sent after it apart: a server that has closed its socket refuses them."""
    outcomes = load.stop()

    def tally(group: list) -> dict:
        answered = sum(outcome.ok for outcome in group)
        return {"ok": answered, "failed": len(group) - answered}

    if signalled_at is None:
        return tally(outcomes)
    return {**tally([outcome for outcome in outcomes if outcome.started < signalled_at]),
            "sent after the signal": tally([outcome for outcome in outcomes if outcome.started >= signalled_at])}


def wait_gone(pids: set[int], timeout_s: float = 120) -> float:
    started = time.monotonic()
    while {pid for pid, _ in gpu_processes()} & pids:
        if time.monotonic() - started > timeout_s:
            raise SystemExit(f"GPU processes {pids} still there after {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - started


def orphan_server_args(options) -> list[str]:
    return ["--infer_type", "vllm", "--max-model-len", "1024", "--gpu-memory-utilization",
            str(options.gpu_memory_utilization), "--enforce-eager", "--timeout", "30",
            "--per_proc_gpus", str(options.per_proc_gpus),
            *(["--workers-per-gpu", str(options.workers_per_gpu)] if options.workers_per_gpu else [])]


def orphans(model: Path, options) -> None:
    with Servers(STOP_WAIT_S) as servers:
        server = servers.add(Server(model, *orphan_server_args(options), log=options.out / "orphans.log"))
        worker = server.ready()["pid"]
        if workers_state(server).get("engine_cores"):
            orphans_shared(server, options)
            orphans_master(model, options)
            return
        before = {pid for pid, _ in show("loaded")}
        load = under_load(server.url, options.clients)
        time.sleep(3)
        os.kill(worker, signal.SIGKILL)
        gone = wait_gone(before)
        # The replacement's engine appears only after the old one's memory is free (the master waits for it).
        print(f"kill -9 of worker {worker} under load: its engine's GPU processes {sorted(before)} gone after "
              f"{gone:.1f} s", flush=True)
        show("right after")
        worker = server.ready()["pid"]
        before = {pid for pid, _ in show(f"replacement {worker} loaded")}
        os.kill(server.process.pid, signal.SIGHUP)
        gone = wait_gone(before)
        worker = server.ready()["pid"]
        print(f"HUP under load: the old engine's GPU processes gone after {gone:.1f} s; new worker {worker}")
        before = {pid for pid, _ in show("after HUP")}
        print("requests during the kill and the reload:", counts(load), flush=True)
        sigterm_under_load(server, before, options)
    orphans_master(model, options)


def sigterm_under_load(server: Server, gpu_pids: set[int], options) -> None:
    """SIGTERM to the master under load: its exit, the requests, and the server's GPU processes (`gpu_pids`) gone."""
    load = under_load(server.url, options.clients)
    time.sleep(3)
    signalled_at = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    code = server.process.wait(timeout=120)
    print(f"SIGTERM under load: master exited {code}; requests: {counts(load, signalled_at)}")
    print(f"  GPU processes of the server gone after another {wait_gone(gpu_pids):.1f} s")
    show("after SIGTERM")


def workers_state(server: Server) -> dict:
    answer = requests.get(f"{server.url}/workers", timeout=5)
    answer.raise_for_status()
    return answer.json()


def front_ends_and_core(server: Server, timeout_s: float = 300, not_before: int = -1) -> tuple[list[int], dict]:
    """Once every worker is ready over a ready engine core launched after generation `not_before`: the workers'
    pids and the core's state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = workers_state(server)
        except requests.RequestException:
            state = {}
        core = (state.get("engine_cores") or [{}])[0]
        if core.get("ready") and core["generation"] > not_before and state["workers"] == len(state["ready"]):
            return sorted(worker["pid"] for worker in state["ready"]), core
        time.sleep(0.2)
    raise SystemExit(f"the workers and their engine core were not ready after {timeout_s} s")


def orphans_shared(server: Server, options) -> None:
    """Faults of a slice whose front ends share one engine core, each under load; GPU processes before and after."""
    front_ends, core = front_ends_and_core(server)
    before = {pid for pid, _ in show(f"loaded: front ends {front_ends} over engine core {core['engine_core_pids']}")}

    load = under_load(server.url, options.clients)
    time.sleep(3)
    victim, killed = front_ends[0], time.monotonic()
    os.kill(victim, signal.SIGKILL)
    while True:  # the replacement: every worker ready again, the victim not among them
        now, _ = front_ends_and_core(server)
        if victim not in now:
            break
        time.sleep(0.2)
    attached = time.monotonic() - killed
    time.sleep(2)
    outcomes = load.stop()
    failed = [outcome for outcome in outcomes if not outcome.ok]
    served = {}
    for outcome in outcomes:
        if outcome.ok:
            served[outcome.worker] = served.get(outcome.worker, 0) + 1
    print(f"kill -9 of front end {victim} under load ({options.clients} clients): a replacement attached after "
          f"{attached:.1f} s; requests answered {len(outcomes) - len(failed)} (by worker {served}), failed "
          f"{len(failed)} ({sorted({outcome.kind for outcome in failed})})", flush=True)
    after = {pid for pid, _ in show("after the front end's replacement")}
    print(f"  the engine core's GPU processes unchanged (no model loaded again): {after == before}", flush=True)

    load = under_load(server.url, options.clients)
    time.sleep(3)
    killed = time.monotonic()
    os.kill(core["engine_core_pids"][0], signal.SIGKILL)
    front_ends, core = front_ends_and_core(server, not_before=core["generation"])
    recovered = time.monotonic() - killed
    print(f"kill -9 of the engine core under load: the slice ready again after {recovered:.1f} s, on engine core "
          f"{core['engine_core_pids']} (generation {core['generation']}); requests: {counts(load)}", flush=True)
    print(f"  the old core's GPU processes gone: {not (before & {pid for pid, _ in show('after the relaunch')})}")

    before = {pid for pid, _ in gpu_processes()}
    load = under_load(server.url, options.clients)
    time.sleep(3)
    os.kill(server.process.pid, signal.SIGHUP)
    time.sleep(2)
    now, _ = front_ends_and_core(server)
    while set(now) & set(front_ends):
        time.sleep(0.2)
        now, _ = front_ends_and_core(server)
    time.sleep(2)
    print(f"HUP under load: front ends {front_ends} replaced by {now}; requests: {counts(load)}", flush=True)
    print(f"  the engine core's GPU processes unchanged: {before == {pid for pid, _ in show('after HUP')}}")

    sigterm_under_load(server, before, options)


def orphans_master(model: Path, options) -> None:
    with Servers(STOP_WAIT_S) as servers:  # stops the server only if the check failed before the kill
        server = servers.add(Server(model, *orphan_server_args(options), log=options.out / "orphans-master.log"))
        server.ready()
        before = {pid for pid, _ in show("second server loaded")}
        load = under_load(server.url, options.clients)
        time.sleep(3)
        os.kill(server.process.pid, signal.SIGKILL)
        print(f"kill -9 of the master under load: its worker's engine GPU processes gone after "
              f"{wait_gone(before):.1f} s; requests: {counts(load)}")
        show("after kill -9 of the master")


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("check", choices=("ceiling", "correctness", "parallel", "orphans", "orphans-master"))
    cli.add_argument("dir", type=Path,
                     help="the model (ceiling, parallel, orphans) or the config and tokenizer (correctness)")
    cli.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    cli.add_argument("--max-model-len", type=int, default=1024)
    cli.add_argument("--per-proc-gpus", type=int, default=1, help="orphans: GPUs per worker (tensor parallel)")
    cli.add_argument("--workers-per-gpu", type=int, help="orphans: front ends per slice (default: the server's)")
    cli.add_argument("--clients", type=int, default=16, help="orphans: the load's client threads")
    cli.add_argument("--requests", type=int, nargs="+", default=[64, 256])
    cli.add_argument("--prompt-len", type=int, default=128)
    cli.add_argument("--output-len", type=int, default=128)
    cli.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    options = cli.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    checks = {"ceiling": ceiling, "correctness": correctness, "parallel": parallel, "orphans": orphans,
              "orphans-master": orphans_master}
    checks[options.check](options.dir, options)


if __name__ == "__main__":
    main()
