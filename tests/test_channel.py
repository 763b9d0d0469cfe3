"""fastast.serving.channel: a ZeroMQ socket read by the event loop, over a real ipc:// connection."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import zmq

from fastast.serving.channel import Channel


@pytest.fixture
def sockets(tmp_path):
    """(the loop's DEALER, a peer ROUTER) connected over ipc://, and the peer's identity for the DEALER."""
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    for socket in (router, dealer):
        socket.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IDENTITY, b"worker")
    router.bind(f"ipc://{tmp_path}/channel")
    dealer.connect(f"ipc://{tmp_path}/channel")
    dealer.send(b"hello")  # the ROUTER learns the DEALER's identity
    assert router.recv_multipart() == [b"worker", b"hello"]
    yield dealer, router
    router.close()
    dealer.close()
    context.term()


async def received(messages: list, count: int, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_every_waiting_message_arrives_in_order_from_one_wake_up(sockets):
    dealer, router = sockets
    for i in range(200):  # all queued before the loop reads anything
        router.send_multipart([b"worker", b"R", str(i).encode()])
    time.sleep(0.2)

    async def scenario():
        messages, wake_ups = [], []
        channel = Channel(dealer, lambda frames: messages.append([frame.bytes for frame in frames]))
        original = channel._drain
        channel._drain = lambda: wake_ups.append(1) or original()
        await received(messages, 200)
        return messages, len(wake_ups)

    messages, wake_ups = asyncio.run(scenario())
    assert messages == [[b"R", str(i).encode()] for i in range(200)]
    assert wake_ups <= 3


def test_a_message_that_arrives_during_a_send_is_not_stranded(sockets):
    """A send processes ZeroMQ's pending commands and so consumes the descriptor's notification of a message that
    arrived meanwhile; the channel looks at the socket's EVENTS after each send, so the message is still read."""
    dealer, router = sockets

    async def scenario():
        messages = []
        channel = Channel(dealer, lambda frames: messages.append(frames[0].bytes))
        await asyncio.sleep(0.05)  # the reader is registered and idle
        router.send_multipart([b"worker", b"reply"])
        time.sleep(0.1)  # delivered to the DEALER's pipe while the loop is not looking
        channel.send([b"request", np.arange(4, dtype=np.float32)])
        await received(messages, 1)
        return messages

    assert asyncio.run(scenario()) == [b"reply"]
    worker, kind, pcm = router.recv_multipart()
    assert (worker, kind) == (b"worker", b"request")
    np.testing.assert_array_equal(np.frombuffer(pcm, dtype=np.float32), np.arange(4, dtype=np.float32))


def test_a_send_to_a_full_or_absent_peer_raises_again_at_once(tmp_path):
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    dealer.connect(f"ipc://{tmp_path}/nobody")

    async def scenario():
        channel = Channel(dealer, lambda frames: None)
        started = time.monotonic()
        with pytest.raises(zmq.Again):
            channel.send([b"request"])
        assert time.monotonic() - started < 0.5
        channel.close()

    asyncio.run(scenario())
    context.term()
