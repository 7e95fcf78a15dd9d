"""Tests for start_gunicorn.sh and its pre-flight (`python -m gunicorn_llm.preflight`), run for real as subprocesses.

Every call runs from a temporary directory (the launcher must work from anywhere) with its own dispatcher state file
and a free port. The error paths must end with exit status 2, one line on stderr naming the problem, and nothing
started: no "Starting gunicorn", nothing listening on the port, no process left behind. No test here starts
gunicorn: the few that follow the launcher past its pre-flight give it a stand-in interpreter (`fake_python`) that
runs the pre-flight for real and only records how gunicorn would have been started.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import free_port
from gunicorn_llm.launcher_options import usage_text
from gunicorn_llm.settings import Declared, declared_settings

pytestmark = pytest.mark.timeout(150)

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "start_gunicorn.sh"
CALL_TIMEOUT_S = 60
USAGE_ERROR = 2

# Every environment variable the server reads: removed from the inherited environment so that the caller's own
# settings cannot change what a test sees.
SETTING_VARIABLES = {setting.env for setting in declared_settings()}


@dataclass
class Launch:
    rc: int
    stdout: str
    stderr: str
    port: int

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def is_listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def leftover_processes(session: int) -> list[psutil.Process]:
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                left.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return left


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SETTING_VARIABLES}
    env.update(
        PYTHON=sys.executable,  # the interpreter running the tests has the server's requirements
        DISPATCHER_STATE=str(tmp_path / "gpu-slices.json"),
        HF_HUB_OFFLINE="1",  # never reach the network
    )
    env.update(extra)
    return env


def launch(tmp_path: Path, *args: str, **env: str) -> Launch:
    """Run start_gunicorn.sh ARGS from tmp_path; keyword arguments set environment variables (PORT: a free one)."""
    port = free_port()
    env.setdefault("PORT", str(port))
    process = subprocess.Popen(
        [str(LAUNCHER), *args],
        cwd=tmp_path,
        env=base_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: whatever it starts can be found, and stopped, by session id
    )
    try:
        stdout, stderr = process.communicate(timeout=CALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"the launcher was still running after {CALL_TIMEOUT_S} s (gunicorn started?)\n{stderr}")
    left = leftover_processes(process.pid)
    for leftover in left:
        leftover.kill()
    assert not left, f"the launcher left processes running: {[p.pid for p in left]}"
    return Launch(process.returncode, stdout, stderr, port)


def assert_nothing_started(result: Launch) -> None:
    assert "Starting gunicorn" not in result.stdout + result.stderr
    assert not is_listening(result.port)
    assert result.stdout == ""


def assert_refused(result: Launch, *fragments: str) -> str:
    """Exit 2, nothing started, and one line on stderr holding every fragment; returns that line."""
    assert result.rc == USAGE_ERROR, result.stderr
    assert_nothing_started(result)
    assert "Traceback" not in result.stderr
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert line.startswith("error: ") or line.startswith("start_gunicorn.sh: "), line
    for fragment in fragments:
        assert fragment in line
    return line


def assert_getopt_refused(result: Launch, problem: str) -> None:
    """getopt's refusal: its line naming the problem, then a pointer to --help."""
    assert result.rc == USAGE_ERROR, result.stderr
    assert_nothing_started(result)
    assert len(result.stderr_lines) == 2, result.stderr
    assert problem in result.stderr_lines[0]
    assert "--help" in result.stderr_lines[1]


# ---------------------------------------------------------------------------------------------------------------
# Command line syntax


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--bogus", "1"], "unrecognized option '--bogus'"),
        (["-x"], "invalid option -- 'x'"),
    ],
)
def test_unknown_option_is_refused(tmp_path, args, problem):
    assert_getopt_refused(launch(tmp_path, *args), problem)


def test_missing_value_at_the_end_is_refused(tmp_path):
    assert_getopt_refused(launch(tmp_path, "--port"), "option '--port' requires an argument")


def test_stray_positional_argument_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--dtype", "auto", "stray"), "unexpected argument 'stray'")


def test_help_exits_zero_and_lists_every_option(tmp_path):
    result = launch(tmp_path, "--help")
    assert result.rc == 0
    assert "Starting gunicorn" not in result.stdout + result.stderr and not is_listening(result.port)
    usage = result.stdout  # help asked for goes to stdout (pipe it to less); errors go to stderr
    assert result.stderr == ""
    assert "Usage:" in usage
    flags = [flag for setting in declared_settings() for flag in setting.flags]
    for flag in flags + ["--help", "--hf-model-name", "--per-proc-gpus", "--infer-type"]:
        assert flag in usage, f"{flag} missing from --help"


def test_short_help_is_help(tmp_path):
    result = launch(tmp_path, "-h")
    assert result.rc == 0
    assert "Usage:" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Bad values: the pre-flight refuses them, naming the option and its variable


BAD_VALUES = [
    (["--port", "x"], ["--port (PORT)='x'", "valid integer"]),
    (["--port", "70000"], ["--port (PORT)='70000'", "65535"]),
    (["--port", "0"], ["--port (PORT)='0'"]),
    (["--per_proc_gpus", "0"], ["--per_proc_gpus (PER_PROC_GPUS)='0'"]),
    (["--workers-per-gpu", "abc"], ["--workers-per-gpu (WORKERS_PER_GPU)='abc'", "valid integer"]),
    (["--timeout", "-1"], ["--timeout (WORKER_TIMEOUT)='-1'"]),
    (["--cpu-workers", "0"], ["--cpu-workers (CPU_WORKERS)='0'"]),
    (["--threads", "0"], ["--threads (THREADS)='0'"]),
    (["--max-batch-size", "0"], ["--max-batch-size (MAX_BATCH_SIZE)='0'"]),
    (["--max-model-len", "0"], ["--max-model-len (MAX_MODEL_LEN)='0'"]),
    (["--max-requests", "-1"], ["--max-requests (MAX_REQUESTS)='-1'"]),
    (["--host", ""], ["--host (HOST)=''"]),
    (["--stream-interval", "0"], ["--stream-interval (STREAM_INTERVAL)='0'"]),
]


@pytest.mark.parametrize("args, fragments", BAD_VALUES, ids=[" ".join(args) for args, _ in BAD_VALUES])
def test_bad_number_is_refused(tmp_path, args, fragments):
    assert_refused(launch(tmp_path, *args), "invalid", *fragments)


def test_unknown_infer_type_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--infer_type", "foo"), "--infer_type (INFER_TYPE)='foo'", "'transformers'")


def test_unknown_dtype_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--dtype", "float8"), "--dtype (DTYPE)='float8'", "'bfloat16'")


def test_unknown_batching_mode_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--batching", "eager"), "--batching (BATCHING)='eager'", "'continuous'")


def test_unknown_log_level_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--log-level", "loud"), "--log-level (LOG_LEVEL)='loud'")


def test_every_bad_value_is_named_on_the_one_line(tmp_path):
    line = assert_refused(launch(tmp_path, "--port", "x", "--dtype", "float8"))
    assert "--port (PORT)" in line and "--dtype (DTYPE)" in line


def test_bad_variable_without_a_flag_is_refused(tmp_path):
    assert_refused(launch(tmp_path, TRUST_REMOTE_CODE="maybe"), "TRUST_REMOTE_CODE='maybe'")


def test_quantization_with_the_transformers_engine_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--quantization", "awq"), "--quantization", "vLLM engine")


@pytest.mark.parametrize(("args", "fragments"), [
    (("--enable-auto-tool-choice",), ("--enable-auto-tool-choice requires --tool-call-parser",)),
    (("--reasoning-parser", "nonesuch"), ("--reasoning-parser nonesuch", "no such parser", "qwen3")),
    (("--enable-auto-tool-choice", "--tool-call-parser", "mistral"),
     ("--tool-call-parser mistral cannot be used with the tokenizer of 'SmolLM2-135M-Instruct'",)),
    (("--chat-template", "no-such.jinja"), ("--chat-template no-such.jinja", "No such file")),
], ids=["auto-without-parser", "unknown-parser", "parser-for-another-tokenizer", "missing-template"])
def test_output_parsers_and_templates_that_cannot_work_are_refused(tmp_path, args, fragments):
    assert_refused(launch(tmp_path, *args), *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Engine choice, case-insensitive


@pytest.mark.parametrize("spelling", ["vLLM", "VLLM", "vllm"])
def test_vllm_in_any_case_is_a_valid_engine(tmp_path, spelling):
    line = assert_refused(launch(tmp_path, "--infer_type", spelling, "--port", "0"), "--port (PORT)='0'")
    assert "INFER_TYPE" not in line


def test_quantization_is_accepted_with_the_vllm_engine(tmp_path):
    line = assert_refused(
        launch(tmp_path, "--infer_type", "vllm", "--quantization", "awq", "--port", "0"), "--port (PORT)='0'"
    )
    assert "quantization" not in line


def test_upper_case_transformers_is_a_valid_engine(tmp_path):
    # Valid: only the deliberately bad port is reported.
    line = assert_refused(launch(tmp_path, "--infer_type", "TRANSFORMERS", "--port", "0"), "--port (PORT)='0'")
    assert "INFER_TYPE" not in line


# ---------------------------------------------------------------------------------------------------------------
# GPU slices (GPU_IDS stands in for NVML, so no GPU is needed)


def test_per_proc_gpus_that_does_not_divide_the_gpus_is_refused(tmp_path):
    assert_refused(
        launch(tmp_path, "--per_proc_gpus", "2", "--gpu-ids", "0,1,2"),
        "--per_proc_gpus 2 does not divide the 3 visible GPUs",
    )


def test_gpu_named_twice_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--gpu-ids", "0,0"), "GPU_IDS='0,0' names a GPU twice")


def test_no_free_gpu_slice_is_refused(tmp_path):
    # The only slice is held by a live process (this one) of another server.
    me = psutil.Process()
    holding = {"devices": ["configured:0"], "pid": me.pid, "started": me.create_time(), "server": "1@1.0"}
    (tmp_path / "gpu-slices.json").write_text(json.dumps({"holdings": [holding]}))
    assert_refused(launch(tmp_path, "--gpu-ids", "0"), "no free GPU slice", str(tmp_path / "gpu-slices.json"))


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_missing_model_folder_is_refused(tmp_path):
    missing = tmp_path / "no-such-folder"
    assert_refused(launch(tmp_path, "--model_name", str(missing)), f"model folder {missing} does not exist")


def test_relative_missing_model_folder_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--model_name", "./no-such-folder"), "./no-such-folder does not exist")


def test_model_folder_without_config_is_refused(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    assert_refused(launch(tmp_path, "--model_name", str(folder)), f"{folder} has no config.json")


def test_hub_name_not_in_the_cache_while_offline_is_refused(tmp_path):
    result = launch(
        tmp_path, "--model_name", "no-such-org/no-such-model", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf")
    )
    assert_refused(result, "'no-such-org/no-such-model' is not in the local Hugging Face cache", "HF_HUB_OFFLINE")


def test_invalid_hub_name_is_refused(tmp_path):
    assert_refused(launch(tmp_path, "--model_name", "a/b/c"), "'a/b/c' is neither a local folder nor a valid")


# ---------------------------------------------------------------------------------------------------------------
# Every spelling of an option is accepted, and reaches its own setting


@pytest.fixture
def preflight_recorder(tmp_path) -> tuple[Path, Path]:
    """(interpreter, record): records the environment the pre-flight would see, and starts nothing; every other
    call (the launcher's option list) runs the real interpreter."""
    record = tmp_path / "preflight-env.json"
    script = tmp_path / "recording-python"
    recorder = f"import json, os; json.dump(dict(os.environ), open({str(record)!r}, 'w')); print('/recorded')"
    python = shlex.quote(sys.executable)
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "gunicorn_llm.preflight" ]; then\n'
        f'  exec {python} -c "{recorder}"\n'
        "fi\n"
        'if [ "$1" = "-m" ] && [ "$2" = "gunicorn" ]; then exit 0; fi\n'
        f'exec {python} "$@"\n'
    )
    script.chmod(0o755)
    return script, record


def spelling_rounds() -> list[list[Declared]]:
    """Round k gives every option that has a k-th spelling with that spelling (the first round: their names)."""
    options = [setting for setting in declared_settings() if setting.flag]
    return [[setting for setting in options if len(setting.flags) > k]
            for k in range(max(len(setting.flags) for setting in options))]


@pytest.mark.parametrize("spelling", range(len(spelling_rounds())), ids=lambda k: f"spelling-{k}")
def test_every_spelling_of_every_option_reaches_its_variable(tmp_path, preflight_recorder, spelling):
    # All options on one command line: a switch that took a value would swallow the option after it.
    interpreter, record = preflight_recorder
    settings = spelling_rounds()[spelling]
    args = []
    for setting in settings:
        args += [setting.flags[spelling]] if setting.switch else [setting.flags[spelling], f"/given/{setting.env}"]
    result = launch(tmp_path, *args, PYTHON=str(interpreter))
    assert result.rc == 0, result.stderr
    seen = json.loads(record.read_text())
    for setting in settings:
        assert seen.get(setting.env) == ("true" if setting.switch else f"/given/{setting.env}"), setting.flags[spelling]


def test_help_is_the_usage_the_settings_render(tmp_path):
    result = launch(tmp_path, "--help")
    assert result.rc == 0
    assert result.stdout == usage_text(LAUNCHER.name) + "\n"


@pytest.mark.parametrize("flag", ["--enforce-eager", "--cuda-graphs"])
def test_switch_without_a_value_is_accepted(tmp_path, flag):
    line = assert_refused(launch(tmp_path, flag, "--port", "0"), "--port (PORT)='0'")
    assert "unrecognized" not in line and "; " not in line


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--model_name", "/no/such/model", "model folder /no/such/model does not exist"),
        ("--model-name", "/no/such/model", "model folder /no/such/model does not exist"),
        ("--hf-model-name", "/no/such/model", "model folder /no/such/model does not exist"),
        ("--infer_type", "foo", "(INFER_TYPE)='foo'"),
        ("--infer-type", "foo", "(INFER_TYPE)='foo'"),
        ("--per_proc_gpus", "0", "(PER_PROC_GPUS)='0'"),
        ("--per-proc-gpus", "0", "(PER_PROC_GPUS)='0'"),
        ("--workers-per-gpu", "0", "(WORKERS_PER_GPU)='0'"),
        ("--workers_per_gpu", "0", "(WORKERS_PER_GPU)='0'"),
        ("--max-model-len", "0", "(MAX_MODEL_LEN)='0'"),
        ("--max_model_len", "0", "(MAX_MODEL_LEN)='0'"),
    ],
)
def test_spelling_sets_its_own_variable(tmp_path, option, value, fragment):
    assert_refused(launch(tmp_path, option, value), fragment)


# ---------------------------------------------------------------------------------------------------------------
# Environment variables


def test_bad_port_variable_alone_is_refused(tmp_path):
    assert_refused(launch(tmp_path, PORT="abc"), "--port (PORT)='abc'", "valid integer")


def test_bad_variable_is_refused_like_its_option(tmp_path):
    assert_refused(launch(tmp_path, DTYPE="float8"), "--dtype (DTYPE)='float8'")


def test_option_overrides_a_bad_variable(tmp_path):
    # PORT=abc would be reported next to the bad dtype if the option had not replaced it.
    line = assert_refused(launch(tmp_path, "--port", str(free_port()), "--dtype", "float8", PORT="abc"), "DTYPE")
    assert "PORT" not in line


def test_bad_option_overrides_a_good_variable(tmp_path):
    assert_refused(launch(tmp_path, "--dtype", "float8", DTYPE="float32"), "--dtype (DTYPE)='float8'")


# ---------------------------------------------------------------------------------------------------------------
# Past the pre-flight: a stand-in interpreter records how gunicorn would have started, and starts nothing


@pytest.fixture
def fake_python(tmp_path) -> tuple[Path, Path]:
    """(interpreter, record): runs everything with the real interpreter except `-m gunicorn`, which it records."""
    record = tmp_path / "gunicorn-call.json"
    script = tmp_path / "fake-python"
    recorder = (
        "import json, os, sys; "
        f"json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))"
    )
    python = shlex.quote(sys.executable)
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "gunicorn" ]; then\n'
        f'  shift 2; exec {python} -c "{recorder}" "$@"\n'
        "fi\n"
        f'exec {python} "$@"\n'
    )
    script.chmod(0o755)
    return script, record


def test_upper_case_transformers_passes_the_preflight(tmp_path, fake_python):
    interpreter, record = fake_python
    result = launch(tmp_path, "--infer_type", "TRANSFORMERS", PYTHON=str(interpreter))
    assert result.rc == 0, result.stderr
    call = json.loads(record.read_text())
    assert call["argv"] == ["--config", "gunicorn_conf.py"]
    assert call["cwd"] == str(REPO)  # gunicorn runs from the repository, wherever the launcher was called from
    assert (Path(call["env"]["MODEL_PATH"]) / "config.json").is_file()
    assert call["env"]["INFER_TYPE"] == "TRANSFORMERS"


def test_option_overrides_its_variable_all_the_way_to_gunicorn(tmp_path, fake_python):
    interpreter, record = fake_python
    port = free_port()
    result = launch(tmp_path, "--port", str(port), PORT="abc", PYTHON=str(interpreter))
    assert result.rc == 0, result.stderr
    assert json.loads(record.read_text())["env"]["PORT"] == str(port)


def test_relative_model_folder_resolves_from_the_callers_directory(tmp_path, fake_python):
    interpreter, record = fake_python
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    result = launch(tmp_path, "--model_name", "my-model", PYTHON=str(interpreter))
    assert result.rc == 0, result.stderr
    assert json.loads(record.read_text())["env"]["MODEL_PATH"] == str(folder.resolve())


# ---------------------------------------------------------------------------------------------------------------
# The pre-flight on its own


def run_preflight(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gunicorn_llm.preflight"],
        cwd=tmp_path,
        env=base_env(tmp_path, PYTHONPATH=str(REPO), **env),
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
    )


def test_preflight_prints_only_the_model_folder(tmp_path):
    result = run_preflight(tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1  # the launcher takes all of stdout as MODEL_PATH
    assert (Path(lines[0]) / "config.json").is_file()


def test_preflight_refuses_with_one_line_and_status_2(tmp_path):
    result = run_preflight(tmp_path, PORT="abc")
    assert result.returncode == USAGE_ERROR
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: invalid --port (PORT)='abc': input should be a valid integer, unable to parse string as an integer"
    ]
