"""systemd: the unit in deploy/ verifies cleanly, and READY=1 reaches systemd only once every worker serves.

The unit is checked with systemd's own tools (`systemd-analyze verify`, `systemd-analyze security`, `systemd-sysusers`;
.ci/run installs systemd when they are missing). The readiness protocol runs for real: a unix datagram socket stands
in for systemd's NOTIFY_SOCKET, the server is started by start_gunicorn.sh with 2 CPU workers, and every datagram is
checked against what the server's log and /ready show at the moment it arrives.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from gunicorn_llm.settings import ServerSettings

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "gunicorn-llm.service"
ENV_FILE = DEPLOY / "gunicorn-llm.env"
SYSUSERS = DEPLOY / "gunicorn-llm.sysusers"
INSTALL_DIR = "/opt/gunicorn-llm"  # where the unit expects the checkout
TOOL_TIMEOUT_S = 60
LOAD_TIMEOUT_S = 180
LOADED_LINE = "model loaded on slice"  # serving.EngineSlot logs it before the worker reports itself loaded


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `apt-get install systemd` (.ci/run does it before `make test`)")
    return path


def unit_values(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given, over all sections (comments and section headers skipped)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def seconds(value: str) -> float:
    """A systemd time span in seconds (the plain forms this unit uses: 330, 330s, 5min, 1h)."""
    match = re.fullmatch(r"(\d+)\s*(s|sec|min|m|h)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match[1]) * {None: 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}[match[2]]


@pytest.fixture
def local_unit(tmp_path) -> Path:
    """The unit, rewritten to run this checkout: systemd-analyze verify checks that ExecStart= is executable and
    that EnvironmentFile= and WorkingDirectory= fit, and /opt/gunicorn-llm does not exist here.

    User=gunicorn-llm stays as it is: `verify` does not resolve users (systemd does that when it starts the
    service), so the test needs no user on this machine; test_sysusers_file_creates_the_units_user checks that the
    shipped sysusers.d file creates exactly that user.
    """
    text = UNIT.read_text()
    rewritten = (
        text.replace(f"ExecStart={INSTALL_DIR}/start_gunicorn.sh", f"ExecStart={ROOT}/start_gunicorn.sh")
        .replace("EnvironmentFile=/etc/gunicorn-llm/gunicorn-llm.env", f"EnvironmentFile={ENV_FILE}")
        .replace(f"WorkingDirectory={INSTALL_DIR}", f"WorkingDirectory={ROOT}")
    )
    changed = [line for line in rewritten.splitlines() if line not in text.splitlines()]
    assert len(changed) == 3, f"expected to rewrite ExecStart, EnvironmentFile, WorkingDirectory; rewrote {changed}"
    path = tmp_path / UNIT.name
    path.write_text(rewritten)
    return path


def test_unit_verifies_without_a_warning(local_unit):
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", "--man=no", str(local_unit)],
        check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=local_unit.parent,
    )
    output = (result.stdout + result.stderr).splitlines()
    # Lines about other units' files of this machine (systemd-analyze loads the targets ours names) are not ours
    # to fix; any other line (unknown key, bad value, missing executable, user name rules, ...) is.
    ours = [line for line in output if not re.match(r"/(usr/)?lib/systemd/|/etc/systemd/|/run/systemd/", line)]
    assert result.returncode == 0 and not ours, "\n".join(output)


def test_unit_exposure_stays_low(local_unit):
    # systemd's own score of the sandbox (0 = locked down, 10 = unrestricted); the unit scores about 4.1 ("OK").
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=50", str(local_unit)],
        check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=local_unit.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_settings_fit_the_server():
    unit = unit_values(UNIT.read_text())
    single = {key: values[-1] for key, values in unit.items()}
    assert single["ExecStart"] == f"{INSTALL_DIR}/start_gunicorn.sh"
    assert single["Type"] == "notify" and single["NotifyAccess"] == "all"  # READY=1 comes from a worker
    assert single["Restart"] == "on-failure"
    assert single["KillMode"] == "control-group"
    # Longer than gunicorn's graceful drain (WORKER_TIMEOUT), so a stop never SIGKILLs requests still running.
    assert seconds(single["TimeoutStopSec"]) > ServerSettings.model_fields["worker_timeout"].default
    assert single["TimeoutStartSec"] == "infinity" or seconds(single["TimeoutStartSec"]) >= 1800
    assert single["PrivateDevices"] == "no"  # /dev/nvidia* must stay visible
    assert "ProtectClock" not in single and "DevicePolicy" not in single and "DeviceAllow" not in single
    assert single["NoNewPrivileges"] == "yes" and single["ProtectSystem"] == "strict"
    assert single["CapabilityBoundingSet"] == ""
    # The host-wide GPU slice file sits in /tmp by default: /tmp must be the host's, and writable.
    state_dir = str(Path(ServerSettings.model_fields["dispatcher_state"].default).parent)
    assert single["PrivateTmp"] == "no" and state_dir in single["ReadWritePaths"].split()
    # The caches the environment file points at are inside the directory systemd makes writable for the user.
    cache_root = f"/var/cache/{single['CacheDirectory']}"
    env = {key: values[-1] for key, values in unit_values(ENV_FILE.read_text()).items()}
    for variable in ("MODEL_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        assert env[variable].startswith(cache_root), (variable, env[variable])


def test_sysusers_file_creates_the_units_user(tmp_path):
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [systemd_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)],
        check=False, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    user = unit_values(UNIT.read_text())["User"][-1]
    passwd = {line.split(":")[0]: line.split(":") for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert user in passwd
    uid, home, shell = int(passwd[user][2]), passwd[user][5], passwd[user][6]
    assert 0 < uid < 1000 and home == "/var/lib/gunicorn-llm" and shell.endswith("nologin")


def test_env_file_documents_every_setting_with_its_default():
    text = ENV_FILE.read_text()
    documented = {}
    for line in text.splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            documented[match[1]] = match[2]
    for name, field in ServerSettings.model_fields.items():
        variable = str(field.validation_alias)
        if variable == "MODEL_PATH":  # set by the launcher, never by hand
            continue
        assert variable in documented, f"{variable} is not in {ENV_FILE.name}"
        shown = documented[variable]
        default = field.default
        if default is None:
            assert shown == "", f"{variable}: unset by default, but the file shows {shown!r}"
        else:
            assert getattr(ServerSettings.model_validate({variable: shown}), name) == default, variable
    for variable in ("MODEL_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "PYTHON"):
        assert variable in documented, f"{variable} is not in {ENV_FILE.name}"
    ServerSettings.model_validate(documented)  # every line uncommented at once is still a valid configuration


# ---------------------------------------------------------------------------------------------------------------
# The readiness protocol


def test_notify_does_nothing_without_a_socket(monkeypatch):
    from gunicorn_llm.ops import systemd_notify

    monkeypatch.delenv(systemd_notify.SOCKET_ENV, raising=False)
    assert systemd_notify.notify("READY=1") is False
    systemd_notify.worker_loaded()  # no socket: returns without touching anything


def test_notify_reaches_an_abstract_socket(monkeypatch):
    from gunicorn_llm.ops import systemd_notify

    name = f"gunicorn-llm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        monkeypatch.setenv(systemd_notify.SOCKET_ENV, "@" + name)
        assert systemd_notify.notify("STATUS=hello")
        assert receiver.recv(4096) == b"STATUS=hello"


class NotifySocket:
    """A stand-in for systemd's notification socket: records every datagram with what was true when it arrived."""

    def __init__(self, directory: Path):
        # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
        self.dir = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp")) if len(str(directory)) > 80 else directory
        self.path = str(self.dir / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.messages: list[dict] = []

    def drain(self, log_text) -> list[dict]:
        """Read every datagram waiting; each is stamped with the number of 'model loaded' log lines right now."""
        new = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            new.append({"raw": data.decode(), "fields": fields, "loaded_in_log": log_text().count(LOADED_LINE)})
        self.messages.extend(new)
        return new

    def readies(self) -> list[dict]:
        return [m for m in self.messages if m["fields"].get("READY") == "1"]

    def close(self) -> None:
        self.sock.close()
        if self.dir.name.startswith("notify-"):
            shutil.rmtree(self.dir, ignore_errors=True)


def ready_answers(server, polls: int) -> list[tuple[int, int]]:
    """`polls` fresh GET /ready calls: (status, worker pid) each."""
    answers = []
    for _ in range(polls):
        response = requests.get(f"{server.url}/ready", timeout=5)
        answers.append((response.status_code, int(response.headers["X-Worker-Pid"])))
    return answers


def test_ready_is_sent_once_and_only_when_every_worker_serves(start_server, tmp_path):
    notify = NotifySocket(tmp_path)
    try:
        server = start_server("--cpu-workers", "2", env={"NOTIFY_SOCKET": notify.path})
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        saw_loading = False
        while not notify.readies():
            assert server.process.poll() is None, f"server exited:\n{server.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no READY=1 in {LOAD_TIMEOUT_S}s: {notify.messages}"
            if notify.drain(server.log):
                continue
            try:
                saw_loading |= requests.get(f"{server.url}/ready", timeout=5).status_code == 503
            except requests.RequestException:
                pass
            time.sleep(0.05)
        ready = notify.readies()[0]

        # When READY=1 arrived, both workers had loaded their models ...
        assert ready["loaded_in_log"] == 2, (ready, server.log()[-3000:])
        # ... and from then on every /ready answer is 200, from both workers.
        workers = server.worker_pids()
        seen: set[int] = set()
        while seen != workers:
            assert time.monotonic() < deadline, f"/ready answered only from {seen}, workers {workers}"
            answers = ready_answers(server, 10)
            assert all(status == 200 for status, _ in answers), answers
            seen |= {pid for _, pid in answers}
        assert saw_loading, "no /ready answered 503 before READY=1: the test did not watch the models load"

        # It came from this server, on behalf of gunicorn's master (the main PID systemd should track) ...
        assert int(ready["fields"]["MAINPID"]) == server.process.pid
        assert ready["fields"]["STATUS"].startswith("ready: 2 of 2")
        # ... after the first worker had reported progress without claiming readiness.
        before = notify.messages[: notify.messages.index(ready)]
        assert any(m["fields"].get("STATUS") == "loading: 1 of 2 worker(s) loaded the model" for m in before), before
        # gunicorn never saw the socket, so its own early READY=1 ("Gunicorn arbiter booted") was never sent.
        time.sleep(2)
        notify.drain(server.log)
        assert not any("Gunicorn arbiter booted" in m["raw"] for m in notify.messages), notify.messages
        assert len(notify.readies()) == 1, notify.messages

        # A worker killed and replaced later reports its reload as STATUS only: READY=1 stays sent once.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not any(m["fields"].get("STATUS", "").startswith("serving: worker") for m in notify.messages):
            assert server.process.poll() is None, f"server exited:\n{server.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no STATUS from the replacement: {notify.messages}"
            notify.drain(server.log)
            time.sleep(0.1)
        replacement = set(server.wait_until_ready(workers=2)) - workers
        status = next(m for m in notify.messages if m["fields"].get("STATUS", "").startswith("serving: worker"))
        assert status["fields"]["STATUS"] == f"serving: worker {replacement.pop()} (re)loaded the model; " \
            "2 of 2 worker(s) loaded the model"
        notify.drain(server.log)
        assert len(notify.readies()) == 1, notify.messages
    finally:
        notify.close()
