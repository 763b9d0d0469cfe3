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
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from fastast.serving import protocol

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
        self._tasks: list[asyncio.Task] = []
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None

    async def connect(self) -> protocol.EngineInfo:
        """Say hello and learn the served model's EngineInfo; then listen for results and for the engine's death."""
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for an engine that is not connected
        self._monitor = monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        monitor.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.address)
        try:
            await asyncio.wait_for(self._socket.send(protocol.HELLO), HELLO_TIMEOUT_S)
            kind, info, state = await asyncio.wait_for(self._socket.recv_multipart(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise EngineUnavailableError(f"no engine answered at {self.address}") from None
        assert kind == protocol.HELLO
        self.info = protocol.EngineInfo(**protocol.decode(info))
        self.state = protocol.EngineState(**protocol.decode(state))
        self.alive = True
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._receive()), loop.create_task(self._watch(monitor))]
        return self.info

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is None or self._context is None:
            return
        self._socket.disable_monitor()
        if self._monitor is not None:
            self._monitor.close()
        self._socket.close()
        self._context.term()

    async def classify(
        self, pcm: np.ndarray, header: protocol.ClassifyHeader, disconnected: asyncio.Future | None = None
    ) -> protocol.Result:
        """The engine's Result for one clip (any status); ClientGoneError when `disconnected` completes first.

        The header's id is replaced by this connection's next request id.
        """
        if not self.alive:
            raise EngineUnavailableError("the inference engine is not running")
        request_id = next(self._ids)
        encoded = protocol.encode(replace(header, id=request_id))
        future: asyncio.Future[protocol.Result] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await self._socket.send_multipart([protocol.CLASSIFY, encoded, pcm], flags=zmq.NOBLOCK, copy=False)
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
        try:
            self._socket.send_multipart([protocol.CANCEL, protocol.encode({"id": request_id})], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the engine is gone: nothing left to cancel

    async def _receive(self) -> None:
        while True:
            kind, body = await self._socket.recv_multipart()
            message = protocol.decode(body)
            if kind == protocol.RESULT:
                future = self._pending.get(message["id"])
                if future is not None and not future.done():
                    future.set_result(protocol.Result(**message))
            elif kind == protocol.STATE:
                self.state = protocol.EngineState(**message)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while (await recv_monitor_message(monitor))["event"] != zmq.EVENT_DISCONNECTED:
            pass
        log.error("the inference engine disconnected; failing %d waiting request(s)", len(self._pending))
        self.alive = False
        for future in self._pending.values():
            if not future.done():
                future.set_exception(EngineUnavailableError("the inference engine stopped"))
