"""One server as one Slurm job: the batch script that runs the launcher on its node, and the sbatch options."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from cluster import slurm
from cluster.state import ClusterState, NodeRecord, Server, StateDir

LAUNCHER = Path(__file__).resolve().parent.parent / "start_gunicorn.sh"
JOB_NAME = "gunicorn-llm"
BIND_NODE_ADDRESS = "node"  # --bind value: each server listens on its node's Slurm address only


def batch_script(bind: str, port: int, launcher_options: list[str]) -> str:
    command = shlex.join([str(LAUNCHER), "--host", bind, "--port", str(port), *launcher_options])
    return (
        "#!/bin/bash\n"
        "# A gunicorn-llm server, submitted by `python -m cluster`. exec: scancel's SIGTERM reaches gunicorn's\n"
        "# master itself, which stops accepting and finishes the requests under way.\n"
        f"exec {command}\n"
    )


def submit(state_dir: StateDir, state: ClusterState, node: NodeRecord, replaces: str | None = None) -> Server:
    """Submit a server to `node` and add it to the state as starting."""
    options = [f"--job-name={JOB_NAME}-{node.name}", f"--nodelist={node.name}", "--nodes=1", "--ntasks=1",
               f"--output={state_dir.job_log(node.name)}", *([f"--gres=gpu:{node.gpus}"] if node.gpus else []),
               *state.sbatch_options]
    host = node.address if state.bind == BIND_NODE_ADDRESS else state.bind
    job_id = slurm.submit(batch_script(host, state.port, state.launcher_options), options)
    server = Server(node.name, node.address, state.port, job_id, time.time(), replaces=replaces)
    state.servers.append(server)
    state_dir.record("submitted", node=node.name, job=job_id, replaces=replaces)
    return server


def log_tail(state_dir: StateDir, server: Server, lines: int = 5) -> str:
    """The end of a server's job log, one line, for error messages."""
    try:
        text = state_dir.job_log(server.node, server.job_id).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
