"""gunicorn's gthread worker, made to stop listening the moment it starts to drain.

gunicorn's gthread worker stops *polling* its listening socket when told to stop, but closes its copy only after
its in-flight requests have finished. Until the last copy is closed the kernel keeps accepting connections that no
process will serve: a client that arrives during a SIGTERM drain (up to --timeout) waits, then is reset, and a
load balancer cannot send it elsewhere. This worker closes its copies as soon as it stops accepting for good. The
socket itself stays open while any other process holds it: on a HUP the master and the new workers keep it.
"""

from __future__ import annotations

import os

from gunicorn.workers.gthread import ThreadWorker


class DrainingThreadWorker(ThreadWorker):
    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        stopping = not self.alive or self.ppid != os.getppid()  # SIGTERM/SIGQUIT, or the master is gone
        if not enabled and stopping:
            for listener in self.sockets:
                listener.close()
