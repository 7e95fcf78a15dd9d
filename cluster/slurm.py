"""Slurm through its own commands (sbatch, squeue, scancel, scontrol): nothing else here talks to Slurm."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime

from cluster import ClusterError

COMMANDS = ("sbatch", "squeue", "scancel", "scontrol")
COMMAND_TIMEOUT_S = 30
# Job states in which the job holds its node; any state not listed (COMPLETED, FAILED, CANCELLED, TIMEOUT,
# NODE_FAIL, OUT_OF_MEMORY, ...) or a job Slurm no longer lists has ended and freed it.
WAITING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
ENDING_STATES = {"COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED"}


@dataclass(frozen=True)
class Node:
    name: str
    address: str  # Slurm's NodeAddr: where nginx and the watcher reach the node's server
    gpus: int  # GPUs its Gres declares


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    started: float | None  # epoch seconds; None until it runs
    ends: float | None  # when Slurm's time limit ends it; None when unlimited or not known yet

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def holds_node(self) -> bool:
        return self.running or self.state in WAITING_STATES or self.state in ENDING_STATES


def require_commands() -> None:
    for command in COMMANDS:
        if shutil.which(command) is None:
            raise ClusterError(f"{command} is not on PATH: install Slurm's client commands (Debian: slurm-client)")


def _run(*args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`{' '.join(args[:3])}` did not answer within {COMMAND_TIMEOUT_S} s", 1) from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise ClusterError(f"`{' '.join(args[:3])}` failed: {message[-1]}", 1)
    return done.stdout


def expand_hostlist(expression: str) -> list[str]:
    """Slurm's hostlist syntax (`gpu[01-04],big1`) as names, in order."""
    return _run("scontrol", "show", "hostnames", expression).split()


def reservation_nodes(reservation: str) -> list[str]:
    try:
        text = _run("scontrol", "-o", "show", "reservation", reservation)
    except ClusterError:
        raise ClusterError(f"no Slurm reservation named {reservation!r}") from None
    match = re.search(r"\bNodes=(\S+)", text)
    if match is None or match.group(1) in ("(null)", ""):
        raise ClusterError(f"Slurm reservation {reservation!r} holds no nodes")
    return expand_hostlist(match.group(1))


def describe_nodes(names: list[str]) -> list[Node]:
    """Address and GPU count of each named node, from Slurm's node table; an unknown name is an error."""
    known: dict[str, Node] = {}
    for line in _run("scontrol", "-o", "show", "node").splitlines():
        name = re.search(r"\bNodeName=(\S+)", line)
        if name is None:
            continue
        address = re.search(r"\bNodeAddr=(\S+)", line)
        gres = re.search(r"\bGres=(\S+)", line)
        known[name.group(1)] = Node(name.group(1), address.group(1) if address else name.group(1),
                                    gpu_count(gres.group(1) if gres else ""))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ClusterError(f"not a Slurm node: {', '.join(unknown)} (`sinfo -N` lists the nodes)")
    return [known[name] for name in names]


def gpu_count(gres: str) -> int:
    """GPUs in a node's Gres string: `gpu:8`, `gpu:h100:8(S:0-1)`, `gpu:a100:4,gpu:t4:2` (6), `(null)` (0)."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = item.split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def submit(script: str, options: list[str]) -> str:
    """sbatch the script (given on stdin) with the options; the new job's id."""
    return _run("sbatch", "--parsable", *options, stdin=script).strip().split(";")[0]


def jobs(job_ids: list[str]) -> dict[str, Job]:
    """The jobs among `job_ids` that Slurm still lists, by id. One squeue call for all of them."""
    if not job_ids:
        return {}
    wanted = set(job_ids)
    user = pwd.getpwuid(os.getuid()).pw_name
    found: dict[str, Job] = {}
    for line in _run("squeue", "--noheader", "--states=all", f"--user={user}", "--format=%i|%T|%S|%e").splitlines():
        job_id, state, started, ends = line.strip().split("|")
        if job_id in wanted:
            found[job_id] = Job(job_id, state, _epoch(started), _epoch(ends))
    return found


def cancel(job_ids: list[str]) -> None:
    """scancel: Slurm sends SIGTERM (SIGKILL after its KillWait). Jobs that have ended already are no error."""
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)


def _epoch(value: str) -> float | None:
    """squeue's local timestamp (`2025-11-21T14:03:07`) in epoch seconds; None for N/A, Unknown, NONE."""
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
