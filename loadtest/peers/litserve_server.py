"""LitServe serving fastast's model the way `fastast serve` does, as far as LitServe's design allows.

    pip install litserve       # 0.2.16 measured; not a dependency of fastast
    python -m loadtest.peers.litserve_server --model DIR --port 8000 --host 127.0.0.1 --workers 2
    # POST /classify with the audio as multipart/form-data field "file"; GET /health answers 200 once it is up

LitServe's endpoints take JSON or a form, not a raw body, so the clients post a form (`loadtest.frontend
--multipart`; fastast serve takes the same form). `--workers` API server processes parse HTTP and the form; one
inference process decodes each request (LitServe runs decode_request beside the model, not in the API servers) and
computes dynamic batches of up to 32 within 5 ms, as fastast's engine does.
"""

from __future__ import annotations

import litserve as ls

from loadtest.peers.common import MAX_BATCH_SIZE, MAX_WAIT_MS, BatchModel, Decoder, arguments


class AudioAPI(ls.LitAPI):
    def __init__(self, model_dir: str, **options):
        super().__init__(**options)
        self.model_dir = model_dir

    def setup(self, device) -> None:
        self.decode = Decoder(self.model_dir)
        self.run = BatchModel(self.model_dir)

    def decode_request(self, request):
        return self.decode(request["file"].file.read())

    def batch(self, inputs: list) -> list:
        return inputs  # clips of different lengths: BatchModel pads them itself

    def predict(self, pcms: list) -> list:
        return self.run(pcms)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, labels: list) -> dict:
        return {"labels": labels}


if __name__ == "__main__":
    ARGS = arguments(__doc__.split("\n\n")[0])
    api = AudioAPI(ARGS.model, max_batch_size=MAX_BATCH_SIZE, batch_timeout=MAX_WAIT_MS / 1000, api_path="/classify")
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host=ARGS.host, port=ARGS.port, num_api_servers=ARGS.workers, generate_client_file=False, log_level="warning")
