"""Start a real `fastast serve` in a subprocess on a free 127.0.0.1 port, and wait until /readyz says 200.

    with running_server(model_dir, "--max-batch-size", "8", env={"FASTAST_MAX_WAIT_MS": "20"}) as base_url:
        httpx.post(f"{base_url}/classify", ...)

`start_server` returns the ServerProcess itself (for tests that signal the process or read its log);
`wav_bytes` encodes audio as a client uploads it, and `scrape` / `metric` read /metrics.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 90.0


def children(pid: int) -> list[int]:
    """The live child processes of pid (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:
            pass
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A `fastast serve` child process; its combined stdout/stderr goes to a temporary log file."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process = process
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fastast serve exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"fastast serve not ready after {timeout:.0f} s:\n{self.log()[-4000:]}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it has not exited within `timeout`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def engine_pid(self) -> int:
        """The engine process's pid, as the supervisor logs it once the workers are up."""
        match = re.search(r"one engine \(pid (\d+)\)", self.log())
        assert match, self.log()[-2000:]
        return int(match[1])

    def worker_pids(self) -> set[int]:
        """The live API worker processes: the supervisor's children other than the engine and multiprocessing's
        resource tracker."""
        return {pid for pid in children(self.process.pid) if pid != self.engine_pid() and b"spawn_main" in cmdline(pid)}

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.terminate()
        self.log_path.unlink(missing_ok=True)


def start_server(model_dir: str | Path, *extra_args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Launch `python -m fastast serve --model DIR` on a free port with extra flags and environment; waits for /readyz.

    FASTAST_* variables of the test process are not inherited, so only `env` and the flags configure the server.
    """
    child_env = {key: value for key, value in os.environ.items() if not key.startswith("FASTAST_")}
    child_env.update(env or {})
    for attempt in range(3):  # another process may grab the free port before the server binds it
        server = _launch(model_dir, extra_args, child_env)
        try:
            server.wait_ready()
            return server
        except BaseException:
            server.process.kill()
            server.process.wait()
            if attempt < 2 and "address already in use" in server.log().lower():
                continue
            raise
    raise AssertionError("unreachable")


def _launch(model_dir: str | Path, extra_args: tuple[str, ...], env: Mapping[str, str]) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "fastast", "serve", "--model", str(model_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), *extra_args]
    log_file = tempfile.NamedTemporaryFile(prefix="fastast-serve-", suffix=".log", delete=False)
    with log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=dict(env))
    return ServerProcess(process, f"http://127.0.0.1:{port}", Path(log_file.name))


@contextmanager
def running_server(model_dir: str | Path, *extra_args: str, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """The base URL of a ready server, stopped (SIGTERM) on exit."""
    with start_server(model_dir, *extra_args, env=env) as server:
        yield server.url


def wav_bytes(wave: np.ndarray, sample_rate: int = 16000, subtype: str = "PCM_16", format: str = "WAV") -> bytes:
    """Audio samples ([samples] or [samples, channels]) encoded in memory, as a client would upload them."""
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, subtype=subtype, format=format)
    return buffer.getvalue()


def scrape(base_url: str) -> dict[tuple[str, frozenset], float]:
    """GET /metrics parsed: {(sample name, frozenset of (label, value))): value}."""
    text = httpx.get(f"{base_url}/metrics", timeout=10.0).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of every sample called `name` whose labels include `labels` (0 when there is none)."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items() if sample == name and wanted <= sample_labels)
