"""The HTTP service: settings, inference backends, the per-r batcher, metrics, the FastAPI app and its server."""
