"""A ZeroMQ socket served by the event loop: every message waiting is handled in one wake-up, sends never wait.

zmq.asyncio makes a future per receive and per send; under load, when many messages wait at once, that cost is
paid per message, on both sides of every request. Here the socket's notification descriptor is watched with the
loop's add_reader: one callback drains whatever has arrived, and sends go straight to the socket (NOBLOCK: a
full queue raises zmq.Again instead of waiting).

ZeroMQ signals that descriptor on edges: any send or receive may consume a notification. Draining until zmq.Again
re-arms it, and after each send the socket's EVENTS are checked, so a message that arrived meanwhile is not
stranded until the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import zmq


class Channel:
    def __init__(self, socket: zmq.Socket, on_message: Callable[[list[zmq.Frame]], None]):
        """Calls on_message(frames) on the running loop for each message `socket` receives; frames are not copied."""
        self.socket = socket
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(socket.FD, self._drain)
        self._loop.call_soon(self._drain)  # messages that arrived before the reader was added

    def send(self, frames: Sequence[bytes | memoryview]) -> None:
        """Queue a message; zmq.Again if the peer's queue is full or it is absent. Frames of at least
        zmq.COPY_THRESHOLD bytes (a clip's PCM) are sent from their buffer without a copy, smaller ones copied."""
        self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        if self.socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._loop.call_soon(self._drain)

    def close(self) -> None:
        """Stop reading and close the socket (unsent messages are dropped: LINGER is the socket's own setting)."""
        if not self.socket.closed:
            self._loop.remove_reader(self.socket.FD)
            self.socket.close()

    def _drain(self) -> None:
        socket = self.socket
        while not socket.closed:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_message(frames)
