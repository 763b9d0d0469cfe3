"""An API worker's connection to the engine: send a clip's PCM, await its result; know when the engine is gone.

One DEALER socket per worker. Replies are matched to requests by id; the engine's state (warming up, ready,
warm-up failed) is pushed to every worker when it changes. When the engine process dies its end of the
connection closes, ZeroMQ's socket monitor reports the disconnect, and every request still waiting fails at once
with EngineUnavailableError (the worker answers 503) instead of hanging until its deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import replace

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from fastast.serving import protocol
from fastast.serving.channel import Channel

log = logging.getLogger("fastast.serving")

HELLO_TIMEOUT_S = 60.0
# A request whose batch started is answered even past its deadline; past this much more, the engine is stuck.
STALL_GRACE_S = 60.0


class EngineUnavailableError(Exception):
    """The engine is gone, unreachable or stuck; the message is safe to show a client."""


class ClientGoneError(Exception):
    """The client disconnected while its request waited; the engine was told to drop it."""


class EngineClient:
    def __init__(self, address: str):
        self.address = address
        self.info: protocol.EngineInfo | None = None
        self.state = protocol.EngineState()
        self.alive = False
        self._pending: dict[int, asyncio.Future[protocol.Result]] = {}
        self._ids = itertools.count()
        self._hello: asyncio.Future[list[zmq.Frame]] | None = None
        self._context: zmq.Context | None = None
        self._channel: Channel | None = None
        self._monitor: Channel | None = None

    async def connect(self) -> protocol.EngineInfo:
        """Say hello and learn the served model's EngineInfo; then listen for results and for the engine's death."""
        self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for an engine that is not connected
        monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.LINGER, 0)
        socket.connect(self.address)
        self._hello = asyncio.get_running_loop().create_future()
        self._channel = Channel(socket, self._receive)
        deadline = time.monotonic() + HELLO_TIMEOUT_S
        while True:  # IMMEDIATE: a HELLO sent before the connection is up is refused, not queued
            try:
                self._channel.send([protocol.HELLO])
                break
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise EngineUnavailableError(f"no engine answered at {self.address}") from None
                await asyncio.sleep(0.01)
        try:
            _, info, state = await asyncio.wait_for(self._hello, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"no engine answered at {self.address}") from None
        self.info = protocol.EngineInfo(**protocol.decode(info.buffer))
        self.state = protocol.EngineState(**protocol.decode(state.buffer))
        self.alive = True
        self._monitor = Channel(monitor, self._watch)
        return self.info

    async def close(self) -> None:
        if self._channel is None or self._context is None:
            return
        self._channel.socket.disable_monitor()
        if self._monitor is not None:
            self._monitor.close()
        self._channel.close()
        self._context.term()

    async def classify(
        self, pcm: np.ndarray, header: protocol.ClassifyHeader, disconnected: asyncio.Future | None = None
    ) -> protocol.Result:
        """The engine's Result for one clip (any status); ClientGoneError when `disconnected` completes first.

        The header's id is replaced by this connection's next request id.
        """
        if not self.alive:
            raise EngineUnavailableError("the inference engine is not running")
        assert self._channel is not None
        request_id = next(self._ids)
        future: asyncio.Future[protocol.Result] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                self._channel.send([protocol.CLASSIFY, protocol.encode(replace(header, id=request_id)), pcm])
            except zmq.Again:
                raise EngineUnavailableError("the inference engine is not reachable") from None
            waited = {future} if disconnected is None else {future, disconnected}
            stall_limit = max(0.0, header.deadline - time.monotonic()) + STALL_GRACE_S
            done, _ = await asyncio.wait(waited, timeout=stall_limit, return_when=asyncio.FIRST_COMPLETED)
            if future in done:
                return future.result()
            if disconnected is not None and disconnected in done:
                self._cancel(request_id)
                raise ClientGoneError()
            raise EngineUnavailableError("the inference engine did not answer in time")
        finally:
            self._pending.pop(request_id, None)

    def _cancel(self, request_id: int) -> None:
        assert self._channel is not None
        try:
            self._channel.send([protocol.CANCEL, protocol.encode({"id": request_id})])
        except zmq.ZMQError:
            pass  # the engine is gone: nothing left to cancel

    def _receive(self, frames: list[zmq.Frame]) -> None:
        kind = frames[0].bytes
        if kind == protocol.HELLO:
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(frames)
            return
        message = protocol.decode(frames[1].buffer)
        if kind == protocol.RESULT:
            future = self._pending.get(message["id"])
            if future is not None and not future.done():
                future.set_result(protocol.Result(**message))
        elif kind == protocol.STATE:
            self.state = protocol.EngineState(**message)

    def _watch(self, frames: list[zmq.Frame]) -> None:
        if parse_monitor_message([frame.bytes for frame in frames])["event"] != zmq.EVENT_DISCONNECTED or not self.alive:
            return
        log.error("the inference engine disconnected; failing %d waiting request(s)", len(self._pending))
        self.alive = False
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailableError("the inference engine stopped"))
