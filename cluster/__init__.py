"""Several machines behind one URL: one gunicorn-llm server job per Slurm node, nginx balancing over them.

`python -m cluster up|watch|status|down` (__main__.py). Slurm schedules the servers (slurm.py, server_job.py),
nginx balances over the ready ones (nginx.py), and the watcher (watcher.py) keeps them so: it checks every server
(probe.py), replaces failed ones, and recycles each after a lifetime, draining it out of nginx first. What was
started is recorded in a state directory (state.py), so that `down` stops exactly that.
"""


class ClusterError(Exception):
    """A problem the command reports in one line: exit status 2 for bad input (nothing started), 1 otherwise."""

    def __init__(self, message: str, exit_status: int = 2):
        super().__init__(message)
        self.exit_status = exit_status
