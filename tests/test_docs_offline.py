"""/docs and /redoc render in a real headless Chromium that can reach nothing but the server.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so an air-gapped deployment showed blank pages;
the assets now come from the installed fastapi-offline package. Chromium resolves every host other than
127.0.0.1 to nothing, as an air-gapped network would.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

import httpx
import pytest
from serverutil import running_server

NO_NETWORK = "MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir) as url:
        yield url


def rendered(url: str) -> str:
    """The page's DOM after its scripts ran (virtual time lets them finish without a fixed sleep)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed; `make test` installs it")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # tests run as root in containers
                "--disable-gpu",
                f"--user-data-dir={profile}",
                f"--host-resolver-rules={NO_NETWORK}",
                "--virtual-time-budget=20000",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_pages_reference_only_the_server_itself(server):
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{server}{page}").text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and all(asset.startswith("/") for asset in assets), assets


def test_swagger_ui_renders_the_classify_operation_offline(server):
    dom = rendered(f"{server}/docs")
    operation = re.search(r'<div class="opblock opblock-post[^"]*"[^>]*>.*?data-path="/classify"', dom, re.DOTALL)
    assert operation, dom[:2000]
    assert "Classify one audio clip at a chosen r" in dom
    assert "OAS 3.1" in dom  # Swagger UI 5: version 4 cannot render OpenAPI 3.1 at all


def test_redoc_renders_the_classify_operation_offline(server):
    dom = rendered(f"{server}/redoc")
    assert "Classify one audio clip at a chosen r" in dom, dom[:2000]
    assert "/classify" in dom and "X-Request-Timeout-Ms" in dom
