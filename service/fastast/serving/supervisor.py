"""`fastast serve`: one engine process per model and device, N API worker processes behind one port.

    supervisor ── engine      loads the model, batches by r, fbank + model on the device (fastast.serving.engine)
               └─ workers×N   HTTP, limits, decode, JSON; all accept on one listening socket (fastast.serving.server)

The port: the supervisor binds and listens once and every worker accepts on that same inherited socket (uvicorn's
own multi-process model). Unlike SO_REUSEPORT, which gives each worker its own accept queue, one shared queue
loses no connection when a worker dies (the queued connections stay for the others), keeps the port bound while
a worker is replaced, and hands each connection to whichever worker is free rather than to a hash's choice.

Faults and exits:
- The engine reports its model (or a one-line error: exit 2) before any worker starts.
- A worker that dies is replaced; more than MAX_RESTARTS within RESTART_WINDOW_S is a crash loop: shut down, exit 1.
- The engine dying is not repaired here: the workers answer what was waiting with 503 at once (they see its
  socket close), the supervisor stops them and exits 1, and Docker or Kubernetes start a fresh container. A dead
  engine usually means a device fault (out of memory, a CUDA error) that leaves the process's device context
  unusable; a fresh process is the reliable repair, and the orchestrator's restart back-off and counters keep a
  crash loop visible, where an in-place restart would hide it.
- SIGTERM (or SIGINT): workers drain (new requests 503 draining, accepted ones answered), then the engine stops,
  and the exit code is 0 if every process exited cleanly. A second signal kills every process at once.
- No orphans: each child is killed by the kernel when the supervisor dies, however it dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from fastast.errors import FastASTError
from fastast.serving.metrics import MULTIPROC_DIR
from fastast.serving.settings import ServeSettings

log = logging.getLogger("fastast.serving")

ENGINE_FAILED = 1
BACKLOG = 2048
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 30.0  # after the drain: how long a process may take to exit before it is killed
LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
_PR_SET_PDEATHSIG = 1


def child_setup(name: str, log_level: str) -> None:
    """First thing in every child: die with the supervisor, stay out of the terminal's Ctrl-C, log with a name."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    supervisor = multiprocessing.parent_process()
    if supervisor is None or os.getppid() != supervisor.pid:  # it died before the line above took effect
        os._exit(1)
    os.setpgid(0, 0)  # the supervisor alone receives the terminal's SIGINT and coordinates the shutdown
    multiprocessing.current_process().name = name
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)


def listen(host: str, port: int) -> socket.socket:
    """The one listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FastASTError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(BACKLOG)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # children never inherit the parent's threads or CUDA
        self.engine: BaseProcess | None = None
        self.workers: dict[int, BaseProcess] = {}
        self.signals = 0
        self.restarts: list[float] = []
        self.metrics_dir: Path | None = None
        self._wake_read, self._wake_write = os.pipe()

    def run(self) -> int:
        """Start everything, supervise until shut down; the exit code."""
        runtime = Path(tempfile.mkdtemp(prefix="fastast-serve-"))
        self.metrics_dir = runtime / "metrics"
        self.metrics_dir.mkdir()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for fd in (self._wake_read, self._wake_write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_write)
        try:
            listener = listen(self.settings.host, self.settings.port)
            endpoint = self._start_engine(f"ipc://{runtime}/engine")
            if self.signals:
                return 0
            for index in range(self.settings.worker_count):
                self._start_worker(index, listener, endpoint)
            log.info(
                "serving %s on http://%s:%d with %d API worker(s) and one engine (pid %d)",
                endpoint.card.name,
                self.settings.host,
                listener.getsockname()[1],
                len(self.workers),
                self.engine.pid,
            )
            return self._supervise(listener, endpoint)
        finally:
            self._kill_all()
            signal.set_wakeup_fd(-1)
            shutil.rmtree(runtime, ignore_errors=True)

    def _on_signal(self, sig: int, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            log.warning("second signal: stopping every process at once")
            self._kill_all()
            os._exit(ENGINE_FAILED)

    # ---- starting ---------------------------------------------------------------------------------------------------

    def _start_engine(self, address: str):
        from fastast.serving.app import EngineEndpoint

        receive, send = self.context.Pipe(duplex=False)
        self.engine = self.context.Process(target=_engine_main, args=(self.settings, address, send), name="engine")
        self._spawn(self.engine)
        send.close()
        while not self.signals:
            ready = wait([receive, self.engine.sentinel, self._wake_read])
            self._drain_wake_pipe()
            if receive in ready or self.engine.sentinel in ready:
                try:  # the engine holds the pipe's only sending end: a message, or EOF once it has exited
                    kind, payload = receive.recv()
                except EOFError:
                    kind, payload = "exited", None
                if kind == "loaded":
                    return EngineEndpoint(address, card=payload)
                self.engine.join()
                raise FastASTError(payload or f"the engine exited with code {self.engine.exitcode} while loading the model")
        return None

    def _start_worker(self, index: int, listener: socket.socket, endpoint) -> None:
        from fastast.serving.server import worker_main

        worker = self.context.Process(
            target=worker_main, args=(self.settings, listener, endpoint, index), name=f"worker-{index}"
        )
        self._spawn(worker)
        self.workers[index] = worker

    def _spawn(self, process: BaseProcess) -> None:
        """Start a child with PROMETHEUS_MULTIPROC_DIR set: prometheus_client reads it when the child imports it."""
        previous = os.environ.get(MULTIPROC_DIR)
        os.environ[MULTIPROC_DIR] = str(self.metrics_dir)
        try:
            process.start()
        finally:
            if previous is None:
                del os.environ[MULTIPROC_DIR]
            else:
                os.environ[MULTIPROC_DIR] = previous

    # ---- supervising ------------------------------------------------------------------------------------------------

    def _supervise(self, listener: socket.socket, endpoint) -> int:
        assert self.engine is not None
        while not self.signals:
            ready = wait([self.engine.sentinel, self._wake_read, *(w.sentinel for w in self.workers.values())])
            self._drain_wake_pipe()
            if self.engine.sentinel in ready:
                log.error("the engine exited with code %s; stopping the workers", self.engine.exitcode)
                self._stop_workers()
                return ENGINE_FAILED
            for index, worker in list(self.workers.items()):
                if worker.sentinel in ready and not self.signals:
                    if not self._replace(index, worker, listener, endpoint):
                        self._stop_workers()
                        self._stop_engine()
                        return ENGINE_FAILED
        return self._shutdown()

    def _replace(self, index: int, worker: BaseProcess, listener: socket.socket, endpoint) -> bool:
        """Start a fresh worker in a dead one's place; False once workers die in a loop."""
        from prometheus_client import multiprocess

        worker.join()
        multiprocess.mark_process_dead(worker.pid, str(self.metrics_dir))
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            log.error("%d workers died within %.0f s; giving up", len(self.restarts), RESTART_WINDOW_S)
            return False
        log.warning("worker %d (pid %s) exited with code %s; starting a new one", index, worker.pid, worker.exitcode)
        self._start_worker(index, listener, endpoint)
        return True

    def _shutdown(self) -> int:
        """The drain: workers first (they finish what they accepted), then the engine; 0 if all exited cleanly."""
        log.info("shutting down: draining %d worker(s)", len(self.workers))
        clean = self._stop_workers()
        return 0 if self._stop_engine() and clean else ENGINE_FAILED

    def _stop_workers(self) -> bool:
        drain_s = self.settings.timeout_s + self.settings.drain_timeout_s + STOP_GRACE_S
        return _terminate(list(self.workers.values()), drain_s)

    def _stop_engine(self) -> bool:
        return self.engine is None or _terminate([self.engine], STOP_GRACE_S)

    def _kill_all(self) -> None:
        for process in [*self.workers.values(), *([self.engine] if self.engine else [])]:
            if process.is_alive():
                process.kill()
                process.join()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_read, 512):
                pass
        except BlockingIOError:
            pass


def _engine_main(*args) -> None:
    """The engine process's entry point, imported lazily: the supervisor itself never loads torch."""
    from fastast.serving.engine import engine_main

    engine_main(*args)


def _terminate(processes: list[BaseProcess], timeout: float) -> bool:
    """SIGTERM, wait up to `timeout`, SIGKILL what is left; True if every process exited cleanly: with 0, or ended
    by the SIGTERM itself, which only happens before a process installs its handler, so before it took any work."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("%s did not exit within %.0f s; killing it", process.name, timeout)
            process.kill()
            process.join()
    return all(process.exitcode in (0, -signal.SIGTERM) for process in processes)


def serve(settings: ServeSettings) -> int:
    """Run the service until shut down; the process exit code."""
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    multiprocessing.current_process().name = "supervisor"
    return Supervisor(settings).run()
