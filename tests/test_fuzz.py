"""Schemathesis against a live server, through the OpenAPI document of the route table (gunicorn_llm/http/protocol/).

The document itself (valid OpenAPI 3.1, every route of the app in it) is checked in-process by tests/test_protocol.py.
Here one real server (transformers engine, 1 CPU worker) is fuzzed through it: schemathesis generates valid and
invalid requests for every route of the table (a bounded, derandomized number per operation, so CI is reproducible)
and checks that no answer is a 5xx (nor a stream that ends in a server error), and that status codes, content types,
headers and JSON bodies are the documented ones. Afterwards every route of the table must have been fuzzed, and the
worker that answered before must still be the one answering: nothing the fuzzer sent crashed it.

Generation is kept small in the test (MAX_TOKENS_CAP below), never in the document. The counts (cases per operation,
statuses, failures, the slowest calls) are printed into pytest's output and written to artifacts/fuzz-summary.txt,
the server's log to artifacts/fuzz-server.log.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import psutil
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gunicorn_llm.http.openapi_spec import openapi_json
from gunicorn_llm.http.protocol import ROUTES, ChatCompletionRequest, CompletionRequest, InferRequest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = ROOT / "artifacts" / "fuzz-summary.txt"
SERVER_LOG = ROOT / "artifacts" / "fuzz-server.log"

MAX_EXAMPLES = 12  # generated cases per operation (fuzzing phase), besides the boundary (coverage) cases
REQUEST_TIMEOUT_S = 120
# Generation is bounded here, in the test, never in the document. The fuzzer may ask for any max_tokens up to the
# context (8192 for the embedded model), n up to 64 and dozens of prompts: valid requests, but minutes each on this
# 2-core CPU, and the module must stay within about 4 minutes. So in a generated body a max_tokens above the cap (yet
# within the context) becomes the cap, and so does an absent one (the default: 16; a chat without a limit may fill
# the context); an n above 2 (yet within its bound) becomes 2; a list of more than 2 valid prompts keeps its first 2.
# Values outside the documented bounds, or above the context, stay as generated: the server must refuse those
# without generating. Nothing valid becomes invalid, nothing invalid becomes valid.
MAX_TOKENS_CAP = 4
N_CAP = 2
PROMPTS_CAP = 2
REQUEST_MODEL = {f"{route.method} {route.path}": route.request for route in ROUTES}  # by schemathesis' label

CONFIG = schemathesis.Config.from_dict({
    "seed": 20240601,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "unique-inputs": True},
    "phases": {"stateful": {"enabled": False}},
    # Failure reports show the request as sent: `max_tokens`, `stop_token_ids`, ... are no secrets.
    "output": {"sanitization": {"enabled": False}},
})
CHECKS = [
    not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
    response_schema_conformance, negative_data_rejection,
]

cases_run: collections.Counter[str] = collections.Counter()
statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
failures: dict[str, set[str]] = collections.defaultdict(set)
seconds: collections.Counter[str] = collections.Counter()  # time in calls, per operation
slowest: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)  # the 2 slowest calls, per operation


# -- the live server ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server("--cpu-workers", "1")
    (pid,) = server.wait_until_ready(1)
    models = requests.get(f"{server.url}/v1/models", timeout=30).json()
    server.fuzz_pid = pid
    server.context = models["data"][0]["max_model_len"]
    return server


def test_the_server_serves_the_document(server):
    served = requests.get(f"{server.url}/openapi.json", timeout=30)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.json() == json.loads(openapi_json())


def test_an_unsupported_method_is_a_405_naming_the_allowed_ones(server):
    """RFC 9110 requires a 405 to carry `Allow` (schemathesis' unsupported_method check, ST204, probes the same)."""
    for method, path in [("DELETE", "/infer"), ("GET", "/generate"), ("PUT", "/v1/completions"), ("POST", "/health"),
                         ("TRACE", "/metrics")]:
        response = requests.request(method, server.url + path, timeout=30)
        assert response.status_code == 405, (method, path, response.status_code)
        assert response.json()["error"]["code"] == 405
        assert "Allow" in response.headers, f"{method} {path}: 405 without an Allow header"


@schemathesis.check
def no_server_error_in_stream(ctx, response, case):
    """A stream answers 200 before it is done: a server error can only show as its last line or event."""
    if response.status_code != 200:
        return
    for line in response.text.splitlines():
        line = line.removeprefix("data: ").strip()
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        error = item.get("error") if isinstance(item, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), int) and error["code"] >= 500:
            raise AssertionError(f"the stream ended with a server error: {line}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_prompt(value) -> bool:
    """A valid prompt in a list of prompts: a non-empty string, or a non-empty list of token ids."""
    if isinstance(value, list):
        return bool(value) and all(_is_int(token) and token >= 0 for token in value)
    return isinstance(value, str) and bool(value)


def _first_prompts(body: dict, key: str) -> None:
    prompts = body.get(key)
    if isinstance(prompts, list) and len(prompts) > PROMPTS_CAP and all(_is_prompt(item) for item in prompts):
        body[key] = prompts[:PROMPTS_CAP]


def _bound_generation(case, context: int) -> None:
    """Keep a generated request's work small (see MAX_TOKENS_CAP); never turn an invalid request into a valid one."""
    body = case.body
    if not isinstance(body, dict):
        return
    request_model = REQUEST_MODEL[case.operation.label]
    if request_model is InferRequest:
        _first_prompts(body, "instances")
        target = body.get("params")
    else:
        target = body
    prompt = body.get("prompt")
    if request_model is CompletionRequest and isinstance(prompt, list) and prompt and not _is_int(prompt[0]):
        _first_prompts(body, "prompt")  # several prompts (one list of token ids is one prompt)
    if not isinstance(target, dict):
        return
    for key in ("max_tokens", "max_completion_tokens"):
        if _is_int(target.get(key)) and MAX_TOKENS_CAP < target[key] <= context:
            target[key] = MAX_TOKENS_CAP
    # Absent is the default; on the OpenAI routes null is too (in SamplingParams null is an invalid value).
    nullable = request_model in (CompletionRequest, ChatCompletionRequest)
    if all(key not in target or (nullable and target[key] is None) for key in ("max_tokens", "max_completion_tokens")):
        target["max_tokens"] = MAX_TOKENS_CAP
    if _is_int(target.get("n")) and N_CAP < target["n"] <= 64:
        target["n"] = N_CAP


# The document the server serves (test_the_server_serves_the_document), loaded at collection so that schemathesis
# makes one test per operation; the cases go to the live server through `base_url`.
schema = schemathesis.openapi.from_dict(json.loads(openapi_json()), config=CONFIG)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, in bounded time
          suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_fails(case, server):
    _bound_generation(case, server.context)
    label = case.operation.label
    cases_run[label] += 1
    started = time.monotonic()
    try:
        response = case.call_and_validate(base_url=server.url, checks=[*CHECKS, no_server_error_in_stream],
                                          timeout=REQUEST_TIMEOUT_S)
    except BaseException as error:  # counted, then reported by pytest as it is
        for failure in getattr(error, "exceptions", None) or [error]:
            failures[label].add(f"{type(failure).__name__}: {str(failure).strip()[:300]}".replace("\n", " "))
        raise
    finally:
        elapsed = time.monotonic() - started
        seconds[label] += elapsed
        body = json.dumps(case.body, default=repr)[:300]
        slowest[label] = sorted([*slowest[label], (elapsed, body)], reverse=True)[:2]
    statuses[label][response.status_code] += 1


def test_the_worker_survived_the_fuzzing(server, capsys):
    """The worker that answered before the fuzzing answers after it: no request crashed it. Prints the counts."""
    try:
        response = requests.get(f"{server.url}/ready", timeout=30)
        after = f"{response.headers.get('X-Worker-Pid')} ({response.status_code})"
    except requests.RequestException as error:
        response, after = None, f"no answer: {error}"
    total_failures = sum(len(found) for found in failures.values())
    lines = [f"schemathesis {schemathesis.__version__}: {sum(cases_run.values())} cases, "
             + f"{total_failures} distinct failures"]
    for label in sorted(cases_run):
        counts = ", ".join(f"{status}: {count}" for status, count in sorted(statuses[label].items()))
        lines.append(f"  {label}: {cases_run[label]} cases ({counts}) in {seconds[label]:.1f} s; "
                     f"failures: {len(failures[label])}")
        lines.extend(f"    - {failure}" for failure in sorted(failures[label]))
        lines.extend(f"    slow: {elapsed:.1f} s {body}" for elapsed, body in slowest[label] if elapsed > 1)
    lines.append(f"  worker before: {server.fuzz_pid}, after: {after}; worker CPU time {_cpu_s(server):.0f} s")
    summary = "\n".join(lines)
    SUMMARY.parent.mkdir(exist_ok=True)
    SUMMARY.write_text(summary + "\n")
    SERVER_LOG.write_text(server.log())
    with capsys.disabled():  # into CI's log, without -s
        print("\n" + summary)
    assert response is not None and response.status_code == 200, after
    assert int(response.headers["X-Worker-Pid"]) == server.fuzz_pid, server.log()[-3000:]
    assert server.worker_pids() == {server.fuzz_pid}
    assert set(cases_run) == set(REQUEST_MODEL), "every route of the table is fuzzed"
    log = server.log()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 300):][:5000]


def _cpu_s(server) -> float:
    """CPU seconds the worker spent: the fuzzing's work, less dependent on the machine's other load than wall time."""
    try:
        times = psutil.Process(server.fuzz_pid).cpu_times()
    except psutil.Error:
        return float("nan")
    return times.user + times.system
