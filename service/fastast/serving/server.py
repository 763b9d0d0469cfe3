"""Running the app under uvicorn, with a SIGTERM that drains before it stops.

One process, one uvicorn worker, one model copy: dynamic batching needs every request in one queue per r.
With N workers each would hold its own model copy (N x the device memory) and its own queues, splitting the
traffic N ways, so batches shrink and latency grows. Scale out with more replicas (containers) instead;
decoding already runs on a thread pool inside this process.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from fastast.serving.app import create_app
from fastast.serving.service import Service
from fastast.serving.settings import ServeSettings

log = logging.getLogger("fastast.serving")

STARTUP_FAILURE = 3  # uvicorn's own exit code when the app cannot start
CONNECTION_GRACE_S = 10.0  # after draining: how long uvicorn waits for open connections to finish


class DrainingServer(uvicorn.Server):
    """SIGTERM: /readyz turns 503 and new work is refused while the server still listens (so load balancers see
    it), every accepted request finishes, then uvicorn's graceful shutdown runs. A second SIGTERM or a SIGINT
    stops at once (uvicorn's own handling)."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_limit_s: float):
        super().__init__(config)
        self.service = service
        self.drain_limit_s = drain_limit_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and self._drain_started is None:
            self._drain_started = time.monotonic()
            self.service.begin_drain()
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            overdue = time.monotonic() - self._drain_started > self.drain_limit_s
            if self.service.idle or overdue:
                if overdue:
                    log.warning("drain limit of %.0f s reached with %d request(s) in flight", self.drain_limit_s, self.service.inflight)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(settings: ServeSettings) -> int:
    """Load the model, listen, and block until shut down; the process exit code."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        lifespan="on",
        log_level=settings.log_level,
        timeout_graceful_shutdown=CONNECTION_GRACE_S,
    )
    # Accepted requests end within their deadline plus one batch; the limit only guards against a wedged device.
    server = DrainingServer(config, app.state.service, drain_limit_s=settings.timeout_s + 30.0)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
