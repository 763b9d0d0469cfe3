"""`fastast serve`: the HTTP service (one model, API worker processes and one engine, dynamic batching by r).

Every flag is also an environment variable FASTAST_<NAME> (fastast.serving.settings.ServeSettings); a flag
given on the command line wins over the environment. The flags are listed here rather than generated from the
settings so that `fastast --help` does not import pydantic; a test keeps both lists equal.
"""

from __future__ import annotations

import argparse

# setting name -> (metavar, help); every field of ServeSettings, nothing else. A metavar of None is a switch.
OPTIONS: dict[str, tuple[str | None, str]] = {
    "model": ("DIR", "model_store folder with model.safetensors and card.json (default model_store/default)"),
    "host": ("ADDR", "address to listen on (default 127.0.0.1)"),
    "port": ("PORT", "TCP port (default 8000)"),
    "default_r": ("R", "ToMe r for requests that give none: a number, or auto (default 0)"),
    "max_r": ("R", "largest r a request may ask for (default: half the model's patch tokens)"),
    "slo_ms": ("MS", "r=auto: p99 latency target; auto requests take the smallest r that meets it (default 200.0)"),
    "auto_max_drop": ("POINTS", "r=auto: largest accuracy drop in the card's r table auto may accept (default 1.0)"),
    "auto_max_r": ("R", "r=auto: highest r auto may use; overrides --auto-max-drop"),
    "max_batch_size": ("N", "requests per batch at most (default 32)"),
    "max_wait_ms": ("MS", "how long a queue's oldest request waits for its batch to fill (default 5.0)"),
    "max_queue": ("N", "windows admitted but not yet in a batch, all r together; more get 429 (default 1024)"),
    "timeout_s": ("S", "request deadline; a request still queued then gets 504 (default 30.0)"),
    "max_audio_s": ("S", "longest audio accepted; longer gets 413 (default 600.0)"),
    "window_hop_s": ("S", "seconds between the starts of a long clip's windows (default: half the model's window)"),
    "request_share": ("F", "largest share of a batch one request's windows may take: lower keeps short requests "
                      "fast beside long ones (default 0.25)"),
    "max_windows": ("N", "most windows one request may have; more get 413 (default: 1024, or --max-queue if lower)"),
    "max_upload_mb": ("MB", "largest upload accepted; larger gets 413 (default 20.0)"),
    "max_channels": ("N", "most audio channels accepted, checked on the header before decoding; more get 413 (default 8)"),
    "max_sample_rate": ("HZ", "highest native sample rate accepted, checked on the header; higher gets 413 (default 192000)"),
    "backend": ("{torch,onnxruntime}", "torch, or onnxruntime on the `fastast export-onnx` graphs in --model (default torch)"),
    "device": ("DEV", "auto, cpu, cuda or cuda:N (default auto)"),
    "dtype": ("{auto,fp32,bf16,fp16}", "auto = fp32 on CPU, bf16 (fp16 without bf16 support) on CUDA (default auto)"),
    "torch_compile": (None, "torch backend: torch.compile graphs for the r values the warm-up runs (the default r "
                      "and r=auto's) before ready; minutes more start-up, any other r runs eagerly (default False)"),
    "workers": ("N", "API worker processes sharing the port (default: usable CPUs, at most 8)"),
    "engine_threads": ("N", "torch CPU threads in the engine (default: usable CPUs minus workers, at least 1)"),
    "decode_threads": ("N", "threads per API worker that decode audio (default 2)"),
    "max_uploads": ("N", "requests per API worker still uploading or decoding; more get 429 (default 64)"),
    "body_timeout_s": ("S", "time a request has to deliver its whole body; slower gets 408 (default 20.0)"),
    "header_timeout_s": ("S", "time a connection has to deliver a request's headers; slower is closed (default 10.0)"),
    "drain_timeout_s": ("S", "on SIGTERM, how long uploads in progress may finish, then 503 (default 10.0)"),
    "allow_unverified": (None, "load weights whose card has no weights_sha256 to check them against, with a warning (default False)"),
    "log_level": ("LEVEL", "critical, error, warning, info or debug (default info)"),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (POST /classify?r=20)",
        description="Serve one model: POST /classify, GET /models, /healthz, /readyz, /metrics, /docs. "
        "Each flag can also be set as the environment variable FASTAST_<FLAG> (e.g. FASTAST_MAX_BATCH_SIZE=64); "
        "flags win over the environment.",
    )
    for name, (metavar, text) in OPTIONS.items():
        if metavar is None:
            parser.add_argument(flag(name), dest=name, action="store_true", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag(name), dest=name, metavar=metavar, default=argparse.SUPPRESS, help=text)
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    """ServeSettings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from fastast.errors import FastASTError
    from fastast.serving.errors import describe_validation_error
    from fastast.serving.settings import ServeSettings

    given = {name: getattr(args, name) for name in OPTIONS if hasattr(args, name)}
    try:
        return ServeSettings(**given)
    except ValidationError as exc:
        raise FastASTError(f"invalid setting (flag or FASTAST_ variable): {describe_validation_error(exc)}") from None


def run(args: argparse.Namespace) -> int:
    from fastast.serving.supervisor import serve

    return serve(settings_from_args(args))
