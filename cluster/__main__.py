"""`python -m cluster up|watch|status|down`: the command line. Every problem is one line on stderr; bad input
exits with status 2 and starts nothing.

    python -m cluster up --nodes 'gpu[01-04]' --listen 0.0.0.0:8000 -- --model_name Qwen/Qwen2.5-7B-Instruct
    python -m cluster watch --lifetime 24h --jitter 2h &
    python -m cluster status
    python -m cluster down
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path

from cluster import ClusterError, commands
from cluster.nginx import ProxySettings
from cluster.state import StateDir
from cluster.watcher import WatchOptions

DEFAULT_STATE_DIR = Path(os.environ.get("GUNICORN_LLM_CLUSTER_STATE",
                                        Path.home() / ".cache" / "gunicorn-llm" / "cluster"))
UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `30m`, `24h`, `1d`, `0.5`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 30m, 24h)")
    return float(match.group(1)) * UNITS_S[match.group(2)]


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="where the cluster's record, job logs and nginx's files live; on a file system the "
                             "nodes share, for the job logs (default: %(default)s, or $GUNICORN_LLM_CLUSTER_STATE)")
    watching = argparse.ArgumentParser(add_help=False)
    defaults = WatchOptions()
    group = watching.add_argument_group("watching (durations: 90, 30m, 24h)")
    group.add_argument("--interval", type=duration, default=defaults.interval_s, help="between checks (%(default)s s)")
    group.add_argument("--failures", type=int, default=defaults.failures,
                       help="failed checks in a row that get a server replaced (%(default)s)")
    group.add_argument("--lifetime", type=duration, default=defaults.lifetime_s,
                       help="recycle each server after serving this long; 0: only before Slurm's time limit")
    group.add_argument("--jitter", type=duration, default=defaults.jitter_s,
                       help="plus a random part of this, so that servers are not recycled together")
    group.add_argument("--drain-timeout", type=duration, default=defaults.drain_timeout_s,
                       help="the longest a server out of nginx may finish its requests (%(default)s s)")
    group.add_argument("--drain-grace", type=duration, default=defaults.drain_grace_s,
                       help="after nginx's reload, before an idle server counts as drained (%(default)s s)")
    group.add_argument("--start-timeout", type=duration, default=defaults.start_timeout_s,
                       help="from a job's start until its model is loaded (%(default)s s)")
    group.add_argument("--check-timeout", type=duration, default=defaults.check_timeout_s,
                       help="one HTTP check (%(default)s s)")

    top = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands_ = top.add_subparsers(dest="command", required=True)
    up = commands_.add_parser("up", parents=[common, watching],
                              help="submit one server per node, put nginx in front, wait until all serve",
                              usage="python -m cluster up (--nodes HOSTLIST | --reservation NAME) [options] "
                                    "[-- LAUNCHER OPTIONS]")
    up.add_argument("--nodes", help="Slurm hostlist, e.g. 'gpu[01-04]'")
    up.add_argument("--reservation", help="a Slurm reservation: its nodes (unless --nodes), and the jobs run in it")
    up.add_argument("--servers", type=int, help="servers to run (default: one per node); fewer than the nodes leaves "
                                                "free nodes, where recycled servers are replaced before they drain")
    up.add_argument("--port", type=int, default=5002, help="the servers' port (%(default)s)")
    up.add_argument("--bind", default="0.0.0.0",
                    help="address the servers listen on (%(default)s); 'node': only their node's Slurm NodeAddr")
    up.add_argument("--listen", default="0.0.0.0:8000", help="nginx's HOST:PORT (%(default)s)")
    up.add_argument("--gpus-per-node", type=int,
                    help="GPUs (gres gpu) each job asks for; 0: none (nodes without GPUs); default: all the GPUs "
                         "Slurm lists for its node")
    up.add_argument("--partition")
    up.add_argument("--time", help="Slurm time limit of each job; servers are recycled before it")
    up.add_argument("--shared", action="store_true",
                    help="do not ask for whole nodes (default: --exclusive, all the node's memory)")
    up.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                    help="passed to sbatch as is, e.g. --sbatch-option=--qos=serving (repeatable)")
    up.add_argument("--max-fails", type=int, default=2,
                    help="nginx: failed attempts within --fail-timeout that take a server out (%(default)s)")
    up.add_argument("--fail-timeout", type=int, default=10, help="nginx: ... for this many seconds (%(default)s)")
    up.add_argument("--read-timeout", type=int, default=3600,
                    help="nginx: seconds a server may stay silent within one answer (%(default)s)")
    up.add_argument("--max-body", default="8m", help="nginx: largest request body (%(default)s)")
    up.add_argument("--watch", action="store_true", help="go on watching once every server serves")
    commands_.add_parser("watch", parents=[common, watching],
                         help="keep the servers healthy: replace failed ones, recycle them after their lifetime")
    commands_.add_parser("status", parents=[common], help="nginx, the watcher, every server")
    commands_.add_parser("down", parents=[common], help="stop the watcher, every job and nginx")
    return top


def main(argv: list[str]) -> int:
    # Everything after `--` is for start_gunicorn.sh on every node.
    launcher_options = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    state_dir = StateDir(args.state_dir.resolve())
    if args.command in ("up", "watch"):
        options = WatchOptions(interval_s=args.interval, failures=args.failures, lifetime_s=args.lifetime,
                               jitter_s=args.jitter, drain_timeout_s=args.drain_timeout,
                               drain_grace_s=args.drain_grace, start_timeout_s=args.start_timeout,
                               check_timeout_s=args.check_timeout)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if args.command == "up":
            state = commands.up(state_dir, _up_request(args, launcher_options), options, stop)
            print(f"serving on http://{state.proxy.listen} through {len(state.upstreams)} server(s): "
                  + ", ".join(state.upstreams))
            if args.watch:
                commands.watch(state_dir, options, stop)
        elif args.command == "watch":
            commands.watch(state_dir, options, stop)
        elif args.command == "status":
            print(commands.status(state_dir))
        elif args.command == "down":
            ended = commands.down(state_dir)
            print(f"no cluster was up in {state_dir.path}" if ended is None
                  else f"down: jobs {', '.join(ended) or '(none)'} ended, nginx stopped")
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    return 0


def _up_request(args: argparse.Namespace, launcher_options: list[str]) -> commands.UpRequest:
    sbatch_options = [*([f"--partition={args.partition}"] if args.partition else []),
                      *([f"--time={args.time}"] if args.time else []),
                      *([] if args.shared else ["--exclusive", "--mem=0"]), *args.sbatch_option]
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise ClusterError(f"--gpus-per-node {args.gpus_per_node}: 0 or more")
    proxy = ProxySettings(listen=args.listen, max_fails=args.max_fails, fail_timeout_s=args.fail_timeout,
                          read_timeout_s=args.read_timeout, max_body=args.max_body)
    return commands.UpRequest(nodes=args.nodes, reservation=args.reservation, servers=args.servers, port=args.port,
                              bind=args.bind, gpus_per_node=args.gpus_per_node, sbatch_options=sbatch_options,
                              launcher_options=launcher_options, proxy=proxy)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
