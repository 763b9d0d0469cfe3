"""The API worker's HTTP protocol (fastast.serving.server): uvicorn's httptools protocol as the workers run it, on
a transport that records what would be sent, so what leaves per response is seen send by send."""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from fastast.serving.server import CoalescingTransport, guarded_protocol


class RecordingTransport(asyncio.Transport):
    """Each write() is one send on a real socket: recorded in order; closing is recorded too."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data) -> None:
        self.sends.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:  # uvicorn's flow control pauses reading while a pipelined request waits
        pass

    def resume_reading(self) -> None:
        pass


async def json_app(scope, receive, send) -> None:
    """An ASGI app that answers what Starlette's JSONResponse sends: a head, then the body, in two messages."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = b'{"path":"%s"}' % scope["path"].encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def serve_bytes(request: bytes) -> RecordingTransport:
    """Feed `request` to the worker's protocol and let the event loop run until its responses are sent."""
    config = uvicorn.Config(json_app, http="httptools", lifespan="off", log_level="warning")
    protocol = guarded_protocol(header_timeout_s=10.0)(config, ServerState(), {}, _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(20):
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


def test_a_response_leaves_in_one_send():
    transport = asyncio.run(serve_bytes(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert len(transport.sends) == 1  # uvicorn alone writes the head and the body separately: two sends
    head, body = transport.sends[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200") and body == b'{"path":"/one"}'


def test_pipelined_responses_keep_their_order():
    transport = asyncio.run(serve_bytes(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"))
    sent = b"".join(transport.sends)
    assert sent.count(b"HTTP/1.1 200") == 2 and sent.index(b'"/a"') < sent.index(b'"/b"')


def test_close_sends_what_is_buffered_first_and_abort_drops_it():
    async def scenario() -> tuple[RecordingTransport, RecordingTransport]:
        loop = asyncio.get_running_loop()
        closed, aborted = RecordingTransport(), RecordingTransport()
        for inner, end in ((closed, "close"), (aborted, "abort")):
            transport = CoalescingTransport(inner, loop)
            transport.write(b"head ")
            transport.write(memoryview(b"body"))
            getattr(transport, end)()
            transport.write(b"late")  # after the end: never sent
        await asyncio.sleep(0)
        return closed, aborted

    closed, aborted = asyncio.run(scenario())
    assert closed.sends == [b"head body"] and closed.closed
    assert aborted.sends == [] and aborted.aborted
