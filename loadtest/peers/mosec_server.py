"""Mosec (Rust HTTP front end, Python stage processes) serving fastast's model the way `fastast serve` does.

    pip install mosec          # 0.9.8 measured; not a dependency of fastast
    python -m loadtest.peers.mosec_server --model DIR --port 8000 --host 127.0.0.1 --workers 2
    # POST /classify with the raw audio body; GET / answers 200 once it is up

Stage 1, `--workers` processes: decode as fastast's API workers do. Stage 2, one process: dynamic batches of up
to 32 within 5 ms, computed as fastast's engine does.
"""

from __future__ import annotations

import os
import sys

from mosec import Server, Worker

from loadtest.peers.common import MAX_BATCH_SIZE, MAX_WAIT_MS, MODEL_ENV, BatchModel, Decoder, arguments


class Decode(Worker):
    def __init__(self):
        super().__init__()
        self.decode = Decoder(os.environ[MODEL_ENV])

    def deserialize(self, data: bytes) -> bytes:
        return data  # the raw audio body, as fastast takes it

    def forward(self, data: bytes):
        return self.decode(data)


class Infer(Worker):
    def __init__(self):
        super().__init__()
        self.run = BatchModel(os.environ[MODEL_ENV])

    def forward(self, data: list) -> list:
        return [{"labels": labels} for labels in self.run(data)]


if __name__ == "__main__":
    ARGS = arguments(__doc__.split("\n\n")[0])
    os.environ[MODEL_ENV] = ARGS.model  # the stage processes are spawned: they read the model from here
    sys.argv = [sys.argv[0], "--port", str(ARGS.port), "--address", ARGS.host, "--log-level", "warning"]
    server = Server()
    server.append_worker(Decode, num=ARGS.workers, route="/classify")
    server.append_worker(Infer, num=1, max_batch_size=MAX_BATCH_SIZE, max_wait_time=MAX_WAIT_MS, route="/classify")
    server.run()
