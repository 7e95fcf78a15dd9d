"""Shared fixtures: the embedded model's folder, free ports, a real server started through the launcher, one
server per engine for the modules that hold both engines to one contract, a server's /metrics read, and the
transformers engine serving with transformers' continuous batching in process."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from benchkit.servers import ServerNotReady, ServerProcess, free_port, launcher_command, stop_servers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    from gunicorn_llm.engines.model_store import embedded_model_dir as resolve

    return resolve()


@pytest.fixture(scope="session")
def reference_model(embedded_model_dir):
    """The embedded model loaded directly with transformers, in float32 (the engine's CPU default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def plain_generate(reference_model, prompt: str, max_new_tokens: int) -> str:
    """One prompt through plain greedy `generate`, decoded as the server decodes answers."""
    import torch

    tokenizer, model = reference_model
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# A prompt's log-probabilities scored among others (a padded batch, a shared prefix's cache) against its own forward
# pass, float32 on CPU: other shapes of the matrix products round differently (measured on the embedded model: up
# to 2.2e-5 for a padded batch of 7 prompts; 1.0e-4 for transformers' own split of a 200-token prompt at token 150)
FLOAT32_SCORING = {"abs": 2e-4, "rel": 1e-5}


def direct_prompt_logprobs(reference_model, prompt: str):
    """log P(token_i | tokens before it) for every prompt token after the first, from one plain forward pass."""
    import torch

    tokenizer, model = reference_model
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(ids).logits.float()
    return torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def continuous_engine(embedded_model_dir):
    """The transformers engine with `--batching continuous` (transformers' own manager), in process on the embedded
    model in float32 (its CPU default), closed when the module ends."""
    from gunicorn_llm.engines.transformers_engine import TransformersEngine
    from gunicorn_llm.settings import ServerSettings

    engine = TransformersEngine(str(embedded_model_dir), "embedded", ServerSettings(BATCHING="continuous",
                                                                                    MAX_MODEL_LEN=256))
    assert engine.paths[0].name == "continuous" and engine.paths[0].masks_rows
    yield engine
    engine.close()


def continuous_steps(engine, monkeypatch) -> list[set[str]]:
    """What the continuous path's steps will hold, recorded as they are prepared: per step, the kinds of the rows
    sampled (constrained, controlled or plain)."""
    path = engine.paths[0]
    steps: list[set[str]] = []
    prepare = path.masked_rows.prepare_tensor_args

    def recording(requests_with_new_token):
        sequences = [path._sequences.get(future.state.request_id) for future in requests_with_new_token]
        steps.append({"constrained" if sequence.matcher else "controlled" if sequence.controls else "plain"
                      for sequence in sequences if sequence is not None})
        return prepare(requests_with_new_token)

    monkeypatch.setattr(path.masked_rows, "prepare_tensor_args", recording)
    return steps


class Server(ServerProcess):
    """A real gunicorn server started with start_gunicorn.sh, stopped with SIGTERM."""

    def __init__(self, args: list[str], state_dir: Path, env: dict[str, str] | None = None):
        port = free_port()
        self.env = {**os.environ, "DISPATCHER_STATE": str(state_dir / "slices.json"), **(env or {})}
        super().__init__(launcher_command(port, args), port, state_dir / f"server-{port}.log", self.env)

    def infer(self, instances: list[str], **params) -> list:
        """POST /infer and return the answer, failing the test on any status but 200."""
        response = requests.post(f"{self.url}/infer", json={"instances": instances, "params": params}, timeout=300)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_until_ready(self, workers: int, timeout_s: float = 180) -> dict[int, str]:
        """Poll /ready until `workers` distinct workers answered 200; return pid -> slice."""
        try:
            ready = self.ready_workers(workers, timeout_s)
        except ServerNotReady as error:
            raise AssertionError(str(error)) from None
        return {pid: answer["slice"] for pid, answer in ready.items()}


def took_deprecated_vllm_prompts(server) -> bool:
    """Whether vLLM warned in the server's log that it was handed raw prompt dicts, which it renders again on a
    deprecated path, rather than engine inputs (vllm_engine.Submission.engine_input)."""
    return "Passing raw prompts to InputProcessor is deprecated" in server.log()


def scrape_metrics(server) -> dict[str, list]:
    """A server's /metrics read with prometheus_client's parser: metric family name -> its samples, over all workers
    (whichever worker answers)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{server.url}/metrics", timeout=30).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def openai_client(server, timeout: float):
    """The openai SDK's client of a server's /v1 routes. No retries: a failed request must fail the test, not be
    retried into a pass."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


def metric_value(samples, name: str, **labels) -> float:
    """The sum of the samples named `name` that carry these labels."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@contextlib.contextmanager
def kept_alive(server: Server):
    """A server test starts and ends with the server up: a server that died fails loudly, with its log."""
    assert server.process.poll() is None, f"the server exited:\n{server.log()[-3000:]}"
    yield
    assert server.process.poll() is None, f"the server exited during the test:\n{server.log()[-3000:]}"


@pytest.fixture
def server_alive(request):
    """For a server module (`pytestmark = [..., pytest.mark.usefixtures("server_alive")]`): each test that uses the
    module's `server` fixture starts and ends with that server up; the module's other tests run as they are."""
    if "server" not in request.fixturenames:
        yield
        return
    with kept_alive(request.getfixturevalue("server")):
        yield


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Start servers with launcher arguments; every one is stopped when the module ends."""
    servers: list[Server] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Server:
        server = Server(list(args), tmp_path_factory.mktemp("server"), env)
        servers.append(server)
        return server

    yield start
    stop_servers(servers)


# Launcher arguments, environment and readiness wait of one small server (1 CPU worker) per engine. Eager mode and a
# 1 GiB KV cache keep vLLM's CPU start-up and memory small (as in test_vllm_e2e.py).
ENGINE_SERVERS = {
    "transformers": (("--cpu-workers", "1"), None, 180),
    "vllm": (("--infer_type", "vLLM", "--cpu-workers", "1"), {"VLLM_CPU_KVCACHE_SPACE": "1"}, 400),
}


@pytest.fixture(scope="module", params=list(ENGINE_SERVERS))
def engine_server(request, start_server):
    """A ready server of each engine in turn (`server.engine` names it; a module's EXTRA_SERVER_ARGS are added to its
    launcher arguments), stopped before the next one starts: the next engine's server gets both CPU cores. The
    fixture's setup counts towards the first test's time limit."""
    args, env, ready_timeout = ENGINE_SERVERS[request.param]
    server = start_server(*args, *getattr(request.module, "EXTRA_SERVER_ARGS", ()), env=env)
    server.engine = request.param
    try:
        deadline = time.monotonic() + ready_timeout
        while True:  # a worker busy loading its model may let a /ready poll time out: poll again
            try:
                server.wait_until_ready(workers=1, timeout_s=max(1.0, deadline - time.monotonic()))
                break
            except requests.Timeout:
                assert time.monotonic() < deadline, server.log()[-3000:]
        yield server
    finally:
        server.stop()


def pytest_unconfigure(config):
    """A test that leaves a thread running which is no daemon (an engine it never closed) would make Python wait for
    it forever as pytest exits, and CI would hang past its limit after the summary. Name it and fail the run."""
    left = [thread.name for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]
    if left:
        sys.stderr.write(f"\npytest: tests left threads running that are not daemons: {', '.join(left)}\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)
