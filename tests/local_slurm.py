"""A throwaway Slurm cluster on this host, for tests: munged, slurmctld and one slurmd per node name, all real.

Everything lives in one temporary folder (config, munge key and socket, state, spool, logs) and every daemon runs in
the foreground as a child of the test, so `stop()` leaves nothing behind. Nodes are names on their own loopback
addresses (n1 on 127.0.0.2, n2 on 127.0.0.3, ...), each served by its own `slurmd -N name` on its own port, so a
server bound to a node's address looks to nginx like one on another machine. Choices this sandbox needs:

- no cgroups: ProctrackType=proctrack/pgid and TaskPlugin=task/none. (proctrack/linuxproc cannot follow gunicorn:
  it reads process names from /proc/PID/stat, and gunicorn's renamed processes, "gunicorn: master [...]", contain
  spaces, so scancel's signals never reach them.)
- GPUs without GPUs: each node declares Gres=gpu:1 backed by /dev/null, which Slurm accepts as a device file. Jobs
  ask for it and get CUDA_VISIBLE_DEVICES=0; the server finds no NVML GPU and serves on CPU.
- SlurmUser=root, the munge key made here, the munge socket in a folder everyone may enter (munged insists).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port

DAEMON_START_TIMEOUT_S = 30
DAEMON_STOP_TIMEOUT_S = 15
JOBS_END_TIMEOUT_S = 60


class LocalSlurm:
    def __init__(self, nodes: int):
        self.root = Path(tempfile.mkdtemp(prefix="gunicorn-llm-slurm-"))
        self.root.chmod(0o755)
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.addresses = {name: f"127.0.0.{i}" for i, name in enumerate(self.nodes, start=2)}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge-socket" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._daemons: list[subprocess.Popen] = []

    def start(self) -> LocalSlurm:
        try:
            self._start_munge()
            self._write_config()
            self._daemon("slurmctld", "-D", "-i")
            for name in self.nodes:
                self._daemon(f"slurmd-{name}", "-D", "-N", name)
            self._wait_for_idle_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, *command: str, timeout_s: float = 30) -> str:
        """A Slurm command against this cluster; its stdout."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s,
                              check=True).stdout

    def jobs(self) -> dict[str, str]:
        """Job id -> state, for every job Slurm lists (ended ones included)."""
        lines = self.run("squeue", "--noheader", "--states=all", "--format=%i %T").split()
        return dict(zip(lines[::2], lines[1::2], strict=False))

    def live_jobs(self) -> dict[str, str]:
        return {job: state for job, state in self.jobs().items()
                if state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING")}

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """Cancel every job and wait for them to end, then stop the daemons; remove the folder."""
        if any(daemon.poll() is None for daemon in self._daemons):
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True, timeout=30, check=False)
            deadline = time.monotonic() + JOBS_END_TIMEOUT_S
            while time.monotonic() < deadline:
                try:
                    if not self.live_jobs():
                        break
                except subprocess.SubprocessError:
                    break
                time.sleep(0.5)
        for daemon in reversed(self._daemons):  # slurmd first, munged last
            if daemon.poll() is None:
                os.killpg(daemon.pid, signal.SIGTERM)
                try:
                    daemon.wait(DAEMON_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.killpg(daemon.pid, signal.SIGKILL)
                    daemon.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- setting up ------------------------------------------------------------------------------------------------

    def _daemon(self, name: str, *args: str) -> None:
        program = name.split("-")[0]
        log = (self.root / "log" / f"{name}.out").open("wb")
        self._daemons.append(subprocess.Popen([program, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        self.munge_socket.parent.mkdir(mode=0o755)
        (self.root / "log").mkdir()
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._daemons.append(subprocess.Popen(
            ["munged", "--foreground", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
             f"--log-file={self.root / 'log' / 'munged.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while not self.munge_socket.exists():
            if self._daemons[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start:\n{self.log('munged')}")
            time.sleep(0.1)

    def _write_config(self) -> None:
        host = socket.gethostname()
        for folder in ("state", "spool"):
            (self.root / folder).mkdir()
        nodes = "\n".join(
            f"NodeName={name} NodeAddr={self.addresses[name]} NodeHostname={host} Port={free_port()} "
            f"CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:1 State=UNKNOWN" for name in self.nodes)
        self.conf.write_text(f"""\
ClusterName=gunicornllmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
GresTypes=gpu
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
{nodes}
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "gres.conf").write_text("Name=gpu File=/dev/null\n")

    def _wait_for_idle_nodes(self) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            try:
                states = self.run("sinfo", "--noheader", "--Node", "--format=%N %T").split()
                if states[1::2] == ["idle"] * len(self.nodes):
                    return
            except subprocess.SubprocessError:
                states = ["(slurmctld not answering)"]
            if time.monotonic() > deadline or any(daemon.poll() is not None for daemon in self._daemons):
                raise RuntimeError(f"Slurm's nodes are not idle: {states}\n{self.log('slurmctld')[-2000:]}")
            time.sleep(0.3)
