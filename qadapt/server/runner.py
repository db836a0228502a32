"""Running the app under uvicorn with a graceful shutdown: drain the engine first, then exit 0.

uvicorn alone, on SIGINT/SIGTERM, stops accepting connections and waits for open
ones while the engine keeps admitting queued requests; past its timeout it cancels
the response tasks (streams cut off without an ending) and finally re-raises the
signal (exit status 130 or -15). Here the first signal drains the engine
(:meth:`qadapt.server.scheduler.Engine.drain`): waiting requests get a 503 at once,
running ones finish within the grace period or end with a 503 (an SSE error event
for streams), and a shutdown that went to plan is a normal exit. A second SIGINT
still forces uvicorn's immediate exit.
"""

from __future__ import annotations

from typing import Any

import uvicorn



class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, server: Any, grace: float):
        super().__init__(config)
        self.qadapt_server, self.grace = server, grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:  # the first signal; runs in the main thread between bytecodes
            self.qadapt_server.begin_shutdown(self.grace)
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)  # uvicorn >= 0.29 re-raises these after shutdown
        if isinstance(captured, list):
            captured.clear()


def run_server(app: Any, *, host: str, port: int, log_level: str, grace: float,
               max_connections: int | None = None) -> None:
    """Serve ``app`` (from :func:`qadapt.server.app.create_app`) until SIGINT/SIGTERM, then shut down gently.

    ``max_connections``: open connections (and tasks) past which uvicorn answers 503 at once,
    so idle or slow clients cannot pile up without bound (the queue bound only counts requests).
    """
    # uvicorn's own timeout is a backstop: the engine has ended every request by ``grace``
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace + 5,
                            limit_concurrency=max_connections)
    GracefulServer(config, app.state.server, grace).run()
