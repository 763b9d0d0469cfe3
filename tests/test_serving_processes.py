"""The process layout of `fastast serve`: API workers behind one port, one engine, and what happens when a process
dies, a client trickles its request, or the server is told to stop. Every server here is real, on a free
loopback port; processes are stopped and resumed with signals to make the interleavings deterministic."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
from serverutil import _launch, alive, children, metric, scrape, start_server

WAV = {"Content-Type": "audio/wav"}


def wait_until(condition, timeout: float = 20.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(step)


def queued(url: str) -> float:
    return metric(scrape(url), "fastast_queue_depth")


def post(url: str, body: bytes, **params):
    return httpx.post(f"{url}/classify", params=params, content=body, headers=WAV, timeout=60.0)


@contextmanager
def paused(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class SlowUpload:
    """A raw connection that sends its headers and then one body byte every `interval` seconds."""

    def __init__(self, url: str, size: int = 10_000, interval: float = 0.2):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        head = f"POST /classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: audio/wav\r\nContent-Length: {size}\r\n\r\n"
        self.sock.sendall(head.encode())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, args=(interval,), daemon=True)
        self.thread.start()

    def _trickle(self, interval: float) -> None:
        while not self.stop.wait(interval):
            try:
                self.sock.sendall(b"R")
            except OSError:
                return

    def response(self) -> tuple[int, dict, float]:
        """(status, JSON body, seconds waited) of the server's answer."""
        started = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            data += chunk
        self.stop.set()
        self.sock.close()
        head, body = data.split(b"\r\n\r\n", 1)
        return int(head.split()[1]), json.loads(body), time.monotonic() - started


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


# ---- one port, one engine ----------------------------------------------------------------------------------------


def test_one_batch_mixes_requests_from_every_worker_and_one_queue_bound_covers_them(tiny_model_dir, speech):
    # The batch may wait 10 s: queueing six requests across paused workers takes seconds on a loaded machine.
    args = ("--workers", "2", "--max-wait-ms", "10000", "--max-batch-size", "64", "--max-queue", "6")
    with start_server(tiny_model_dir, *args) as server, ThreadPoolExecutor(8) as pool:
        first, second = sorted(server.worker_pids())
        futures = []
        for busy, idle in ((first, second), (second, first)):  # three requests accepted by each worker in turn
            with paused(idle):
                futures += [pool.submit(post, server.url, speech) for _ in range(3)]
                wait_until(lambda: queued(server.url) == len(futures))
        refused = post(server.url, speech)  # a seventh, whichever worker takes it: the engine's queue is full
        responses = [future.result() for future in futures]
    assert refused.status_code == 429 and refused.json()["error"] == "queue_full"
    assert [response.status_code for response in responses] == [200] * 6
    assert {response.json()["batch_size"] for response in responses} == {6}  # one batch, from both workers


def test_engine_death_answers_waiting_requests_503_at_once_and_the_server_exits_1(tiny_model_dir, speech):
    with start_server(tiny_model_dir, "--workers", "2", "--max-wait-ms", "20000", "--max-batch-size", "64") as server:
        tree = [server.process.pid, *children(server.process.pid)]
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(post, server.url, speech) for _ in range(3)]
            wait_until(lambda: queued(server.url) == 3)
            killed = time.monotonic()
            os.kill(server.engine_pid(), signal.SIGKILL)
            responses = [future.result() for future in futures]
        answered_s = time.monotonic() - killed
        exit_code = server.process.wait(timeout=60)
    assert [response.status_code for response in responses] == [503] * 3
    assert {response.json()["error"] for response in responses} == {"engine_unavailable"}
    assert answered_s < 5  # not held until their 30 s deadline
    assert exit_code == 1, server.log()[-3000:]
    wait_until(lambda: not any(alive(pid) for pid in tree), timeout=10)


def test_engine_death_while_workers_start_exits_at_once(tiny_model_dir):
    """Workers waiting on their hello to an engine that then dies must not sit out the hello's 60 s time-out."""
    server = _launch(tiny_model_dir, ("--workers", "2"), {k: v for k, v in os.environ.items() if not k.startswith("FASTAST_")})
    with server:
        wait_until(lambda: "one engine (pid" in server.log())
        engine = server.engine_pid()
        os.kill(engine, signal.SIGSTOP)  # it cannot answer: both workers stay in their start-up
        wait_until(lambda: server.log().count("Waiting for application startup") == 2, timeout=60)
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        exit_code = server.process.wait(timeout=60)
        assert exit_code == 1 and time.monotonic() - killed < 15, server.log()[-3000:]


def test_a_dead_worker_is_replaced_and_service_continues(tiny_model_dir, speech):
    with start_server(tiny_model_dir, "--workers", "2") as server:
        before = server.worker_pids()
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids())
        responses = [post(server.url, speech) for _ in range(6)]
        assert "starting a new one" in server.log()
        assert server.terminate() == 0, server.log()[-3000:]
    assert [response.status_code for response in responses] == [200] * 6


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_no_process_outlives_the_server(tiny_model_dir, how):
    server = start_server(tiny_model_dir, "--workers", "2")
    with server:
        tree = children(server.process.pid)
        assert len(tree) >= 3  # the engine, two workers (and multiprocessing's resource tracker)
        if how == "sigkill":
            server.process.kill()  # no chance to clean up: the kernel ends the children (PR_SET_PDEATHSIG)
        else:
            assert server.terminate() == 0
        wait_until(lambda: not any(alive(pid) for pid in tree), timeout=15)


# ---- clients that trickle ------------------------------------------------------------------------------------------


def test_slow_uploads_take_no_queue_place_and_time_out_with_408(tiny_model_dir, speech):
    args = ("--workers", "1", "--max-queue", "2", "--body-timeout-s", "3", "--max-wait-ms", "5")
    with start_server(tiny_model_dir, *args) as server:
        attackers = [SlowUpload(server.url) for _ in range(6)]  # three times the queue bound, uploading forever
        time.sleep(0.5)
        served = [post(server.url, speech) for _ in range(4)]
        answers = [attacker.response() for attacker in attackers]
    assert [response.status_code for response in served] == [200] * 4
    for status, body, waited_s in answers:
        assert status == 408 and body["error"] == "body_timeout" and waited_s < 10


def test_uploads_beyond_the_per_worker_bound_get_429(tiny_model_dir, speech):
    with start_server(tiny_model_dir, "--workers", "1", "--max-uploads", "2", "--body-timeout-s", "5") as server:
        attackers = [SlowUpload(server.url) for _ in range(2)]
        time.sleep(0.5)
        refused = post(server.url, speech)
        for attacker in attackers:
            attacker.response()
        after = post(server.url, speech)
    assert refused.status_code == 429 and refused.json()["error"] == "too_many_uploads"
    assert refused.headers["Retry-After"] == "1"
    assert after.status_code == 200


def test_trickled_headers_are_cut_off_and_parser_errors_are_json(tiny_model_dir):
    with start_server(tiny_model_dir, "--workers", "1", "--header-timeout-s", "1") as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=15) as trickler:
            trickler.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            started = time.monotonic()
            closed = trickler.recv(1024)
            closed_s = time.monotonic() - started
        with socket.create_connection((host, int(port)), timeout=15) as garbage:
            garbage.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
            reply = garbage.recv(65536)
    assert closed == b"" and 0.8 < closed_s < 8
    head, body = reply.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_request"


def test_drain_cuts_slow_uploads_off_after_drain_timeout_and_exits_0_promptly(tiny_model_dir):
    with start_server(tiny_model_dir, "--workers", "1", "--drain-timeout-s", "1", "--body-timeout-s", "60") as server:
        attacker = SlowUpload(server.url)
        time.sleep(0.5)
        stopped = time.monotonic()
        server.process.terminate()  # SIGTERM
        status, body, _ = attacker.response()
        exit_code = server.process.wait(timeout=30)
        stop_s = time.monotonic() - stopped
    assert status == 503 and body["error"] == "draining"
    assert exit_code == 0 and stop_s < 15  # not held for the body timeout (60 s) or the request deadline (30 s)
