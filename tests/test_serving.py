"""`fastast serve` end to end: a real uvicorn server on a loopback port, real speech and tones."""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import tone
from serverutil import metric, scrape, start_server, wav_bytes

MAX_BATCH = 4
NUM_CLASSES = 35  # the tiny model has the Speech Commands labels


@pytest.fixture(scope="module")
def server_process(tiny_model_dir):
    # A long max wait makes batches form reliably on a busy CPU; small limits make 413s cheap to provoke.
    args = ("--max-batch-size", str(MAX_BATCH), "--max-wait-ms", "200", "--max-audio-s", "5")
    with start_server(tiny_model_dir, *args, env={"FASTAST_MAX_UPLOAD_MB": "1"}) as process:
        yield process


@pytest.fixture(scope="module")
def server(server_process) -> str:
    return server_process.url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=30.0) as c:
        yield c


def scores_of(body: dict) -> np.ndarray:
    """The full score vector of a response made with top_k=NUM_CLASSES."""
    scores = np.zeros(NUM_CLASSES)
    for entry in body["labels"]:
        scores[entry["index"]] = entry["score"]
    return scores


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code and body["detail"]


# ---- the API ----------------------------------------------------------------------------------------------------


def test_classify_multipart(client, speech):
    response = client.post("/classify", params={"r": 8, "top_k": 3}, files={"file": ("speech.wav", speech, "audio/wav")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny" and body["r"] == 8 and body["batch_size"] >= 1
    assert [entry["score"] for entry in body["labels"]] == sorted((e["score"] for e in body["labels"]), reverse=True)
    assert len(body["labels"]) == 3
    assert {"label", "index", "score"} == set(body["labels"][0])
    timing = body["timing_ms"]
    assert 0 <= timing["queue"] <= timing["total"] and 0 < timing["inference"] <= timing["total"]


def test_classify_raw_body_matches_multipart_and_softmax(client, speech):
    raw = client.post("/classify", params={"top_k": NUM_CLASSES}, content=speech, headers={"Content-Type": "audio/wav"})
    multipart = client.post("/classify", params={"top_k": NUM_CLASSES}, files={"file": ("a.wav", speech)})
    octet = client.post(
        "/classify", params={"top_k": NUM_CLASSES}, content=speech, headers={"Content-Type": "application/octet-stream"}
    )
    for response in (raw, multipart, octet):
        assert response.status_code == 200, response.text
        assert response.json()["r"] == 0  # the deployment default
    np.testing.assert_allclose(scores_of(raw.json()), scores_of(multipart.json()), atol=1e-6)
    np.testing.assert_allclose(scores_of(raw.json()), scores_of(octet.json()), atol=1e-6)
    assert scores_of(raw.json()).sum() == pytest.approx(1.0, abs=1e-4)  # single-label model: softmax


@pytest.mark.parametrize(
    "sample_rate,channels,subtype,fmt",
    [(8000, 1, "PCM_16", "WAV"), (44100, 2, "PCM_24", "WAV"), (48000, 4, "FLOAT", "WAV"), (22050, 1, "PCM_16", "FLAC")],
)
def test_any_sample_rate_and_channel_count(client, sample_rate, channels, subtype, fmt):
    data = wav_bytes(tone(1.0, sample_rate, 440.0, channels), sample_rate, subtype, fmt)
    response = client.post("/classify", content=data, headers={"Content-Type": "audio/x-wav"})
    assert response.status_code == 200, response.text


def test_models_health_ready_docs(client):
    models = client.get("/models").json()["models"]
    assert len(models) == 1
    info = models[0]
    assert info["name"] == "tiny" and info["task"] == "single-label" and len(info["labels"]) == NUM_CLASSES
    assert info["r"] == {"min": 0, "max": 72, "default": 0}  # 12 x 12 patches: max r = 144 // 2
    assert info["input"]["target_length"] == 128 and info["backend"] == {"name": "torch", "device": "cpu", "dtype": "fp32"}
    assert info["limits"]["max_batch_size"] == MAX_BATCH and info["limits"]["max_upload_mb"] == 1.0
    assert info["limits"]["max_channels"] == 8 and info["limits"]["max_sample_rate"] == 192000
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    assert "swagger" in client.get("/docs").text.lower()
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/classify"]["post"]
    assert {"400", "413", "415", "422", "429", "500", "503", "504"} <= set(classify["responses"])
    assert classify["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert {p["name"] for p in classify["parameters"]} == {"r", "top_k", "hop_s", "aggregate", "timeline", "X-Request-Timeout-Ms"}
    assert {"multipart/form-data", "audio/*", "application/octet-stream"} == set(classify["requestBody"]["content"])
    assert {"/models", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


# ---- batching ----------------------------------------------------------------------------------------------------


def test_mixed_r_concurrency_batches_hold_one_r(client, server, speech):
    plan = [0] * 3 + [4] * 5 + [8] * 6  # unequal group sizes: a batch mixing r would show up in the counts below
    before = scrape(server)

    def post(r: int) -> dict:
        response = client.post("/classify", params={"r": r}, content=speech, headers={"Content-Type": "audio/wav"})
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        bodies = list(pool.map(post, plan))
    after = scrape(server)
    assert [body["r"] for body in bodies] == plan
    for r, count in Counter(plan).items():
        sizes = Counter(body["batch_size"] for body in bodies if body["r"] == r)
        # A batch of size b at r answers b requests at r with batch_size b.
        assert all(n % size == 0 for size, n in sizes.items()), (r, sizes)
        assert all(size <= min(count, MAX_BATCH) for size in sizes), (r, sizes)
        delta = {
            name: metric(after, name, r=str(r)) - metric(before, name, r=str(r))
            for name in ("fastast_samples_total", "fastast_batch_size_sum", "fastast_requests_total")
        }
        assert delta == {"fastast_samples_total": count, "fastast_batch_size_sum": count, "fastast_requests_total": count}
    assert max(body["batch_size"] for body in bodies) > 1


def test_scores_do_not_depend_on_the_batch(client, speech):
    clips = [
        speech,
        wav_bytes(tone(0.4, 16000, 300.0)),
        wav_bytes(tone(2.5, 44100, 1000.0, channels=2), 44100),
        wav_bytes(tone(1.3, 8000, 600.0), 8000),
    ]
    params = {"r": 6, "top_k": NUM_CLASSES}

    def post(data: bytes) -> dict:
        response = client.post("/classify", params=params, content=data, headers={"Content-Type": "audio/wav"})
        assert response.status_code == 200, response.text
        return response.json()

    alone = [post(data) for data in clips]
    assert [body["windows"] for body in alone] == [1, 1, 3, 2]  # the 2.5 s and 1.3 s clips: several windows
    assert all(body["batch_size"] <= body["windows"] for body in alone)  # alone: batches of its own windows only

    def shared(bodies: list[dict]) -> int:  # how many clips ran in a bigger batch than alone: beside other clips
        return sum(body["batch_size"] > solo["batch_size"] for body, solo in zip(bodies, alone))

    for _ in range(3):  # a loaded CPU may split the group; a few tries make a shared batch all but certain
        with ThreadPoolExecutor(max_workers=len(clips)) as pool:
            together = list(pool.map(post, clips))
        if shared(together) >= 2:
            break
    # Clips of different lengths (and rates) shared a batch; every clip's scores match its solo run.
    assert shared(together) >= 2, [body["batch_size"] for body in together]
    for solo, batched in zip(alone, together):
        np.testing.assert_allclose(scores_of(batched), scores_of(solo), atol=1e-4, rtol=0)


# ---- bad input: always a JSON 4xx ------------------------------------------------------------------------------


def _truncated_wav() -> bytes:
    data = wav_bytes(tone(1.0))
    return data[: len(data) // 2]


def _nan_wav() -> bytes:
    wave = tone(1.0)
    wave[100] = np.nan
    wave[200] = np.inf
    return wav_bytes(wave, subtype="FLOAT")


BAD_AUDIO = {
    "text": (b"this is not audio at all, just some text " * 20, 400, "invalid_audio"),
    "corrupt_riff": (b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 4, 400, "invalid_audio"),
    "truncated": (_truncated_wav(), 400, "invalid_audio"),
    "zero_length": (wav_bytes(np.zeros(0, dtype=np.float32)), 400, "invalid_audio"),
    "shorter_than_a_frame": (wav_bytes(tone(0.01)), 400, "invalid_audio"),
    "nan_inf": (_nan_wav(), 400, "invalid_audio"),
    "empty": (b"", 400, "empty_body"),
    "too_long": (wav_bytes(tone(10.0)), 413, "audio_too_long"),
    "too_big": (bytes(1_100_000), 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_raw_body(client, case):
    data, status, code = BAD_AUDIO[case]
    assert_error(client.post("/classify", content=data, headers={"Content-Type": "audio/wav"}), status, code)


@pytest.mark.parametrize("case", ["text", "truncated", "nan_inf", "empty", "too_long", "too_big"])
def test_bad_audio_multipart(client, case):
    data, status, code = BAD_AUDIO[case]
    assert_error(client.post("/classify", files={"file": ("x.wav", data, "audio/wav")}), status, code)


def test_upload_limit_enforced_while_streaming(server):
    """A chunked upload has no Content-Length: the server must answer 413 once 1 MB has arrived, not read on."""
    host, port = httpx.URL(server).host, httpx.URL(server).port
    chunk = bytes(64_000)
    limit = 200 * 1_000_000  # a server that buffered everything would read all 200 MB before answering
    sent, reply = 0, b""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        deadline = time.monotonic() + 30
        while sent < limit and time.monotonic() < deadline:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
        while b"payload_too_large" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"payload_too_large" in reply
    assert sent < limit / 10, sent


@pytest.mark.parametrize(
    "params,headers,code",
    [
        ({"r": -1}, {}, "invalid_parameter"),
        ({"r": 73}, {}, "invalid_parameter"),
        ({"r": "abc"}, {}, "invalid_parameter"),
        ({"r": "2.5"}, {}, "invalid_parameter"),
        ({"top_k": 0}, {}, "invalid_parameter"),
        ({"top_k": NUM_CLASSES + 1}, {}, "invalid_parameter"),
        ({"top_k": "many"}, {}, "invalid_parameter"),
        ({"r": "1" * 4301}, {}, "invalid_parameter"),  # past Python's int-digit limit: was a 500
        ({"top_k": "1" * 4301}, {}, "invalid_parameter"),
        ({"r": "٣"}, {}, "invalid_parameter"),  # ARABIC-INDIC DIGIT THREE: was read as r=3
        ({}, {"X-Request-Timeout-Ms": "soon"}, "invalid_parameter"),
        ({}, {"X-Request-Timeout-Ms": "-5"}, "invalid_parameter"),
        ({}, {"X-Request-Timeout-Ms": "inf"}, "invalid_parameter"),
        ({}, {"X-Request-Timeout-Ms": "1e400"}, "invalid_parameter"),
        ({}, {"X-Request-Timeout-Ms": "5e-324"}, "invalid_parameter"),
        ({}, {"X-Request-Timeout-Ms": "30001"}, "invalid_parameter"),  # past the server's --timeout-s of 30 s
    ],
)
def test_bad_parameters_422(client, speech, params, headers, code):
    response = client.post("/classify", params=params, content=speech, headers={"Content-Type": "audio/wav", **headers})
    assert_error(response, 422, code)


def test_unknown_content_type_415(client, speech):
    for content_type in ("text/plain", "application/json", "application/x-www-form-urlencoded"):
        response = client.post("/classify", content=speech, headers={"Content-Type": content_type})
        assert_error(response, 415, "unsupported_media_type")


def test_multipart_without_file_field(client, speech):
    assert_error(client.post("/classify", files={"audio": ("a.wav", speech)}), 400, "missing_file")
    assert_error(client.post("/classify", data={"file": "not a file"}, files={"x": ("a", b"1")}), 400, "missing_file")
    broken = client.post("/classify", content=b"--nope\r\n", headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert 400 <= broken.status_code < 500 and set(broken.json()) == {"error", "detail"}


def test_routing_errors_are_json(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/classify"), 405, "method_not_allowed")


# ---- decompression amplification: the header is checked first, and decoding holds mono samples only --------------


def peak_rss(process: subprocess.Popen) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    for line in open(f"/proc/{process.pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.fixture(scope="module")
def many_channel_ogg(tmp_path_factory) -> bytes:
    """255 channels of silence at 96 kHz in Ogg Vorbis: about 17 KB that decode to 440 MB of float32.

    The issue's file is 29 s long (96 KB, 2.8 GB); sox needs about 2 s of CPU per second of it, and the server
    here refuses more than 5 s from the header alone, so 4.5 s.
    """
    if shutil.which("sox") is None:
        pytest.fail("sox is not installed; `make test` installs it")
    path = tmp_path_factory.mktemp("bomb") / "many.ogg"
    subprocess.run(["sox", "-D", "-n", "-r", "96000", "-c", "255", str(path), "trim", "0", "4.5"], check=True)
    return path.read_bytes()


def test_many_channels_are_refused_from_the_header(client, server_process, many_channel_ogg):
    before = peak_rss(server_process.process)
    response = client.post("/classify", content=many_channel_ogg, headers={"Content-Type": "audio/ogg"})
    assert_error(response, 413, "audio_too_large")
    assert response.json()["detail"] == "audio has 255 channels; the limit is 8"
    assert peak_rss(server_process.process) - before < 300e6


def test_an_allowed_many_channel_upload_is_decoded_within_mono_memory(tiny_model_dir, many_channel_ogg):
    """With --max-channels 255 the same file is decoded, block by block: the server's peak memory barely moves."""
    with start_server(tiny_model_dir, "--max-channels", "255") as server:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            before = peak_rss(server.process)
            response = client.post("/classify", content=many_channel_ogg, headers={"Content-Type": "audio/ogg"})
            assert response.status_code == 200, response.text
            assert peak_rss(server.process) - before < 300e6


def test_sample_rate_past_the_limit_is_refused(client):
    flac = wav_bytes(np.zeros((65535, 8), dtype=np.float32), 655350, format="FLAC")  # FLAC's highest rate
    response = client.post("/classify", content=flac, headers={"Content-Type": "audio/flac"})
    assert_error(response, 413, "audio_too_large")
    assert response.json()["detail"] == "audio is sampled at 655350 Hz; the limit is 192000 Hz"


# ---- metrics -----------------------------------------------------------------------------------------------------


def test_metrics_present_and_counting(client, server, speech):
    before = scrape(server)
    for _ in range(2):
        assert client.post("/classify", params={"r": 2}, content=speech, headers={"Content-Type": "audio/wav"}).status_code == 200
    assert client.post("/classify", params={"r": 2}, content=b"junk", headers={"Content-Type": "audio/wav"}).status_code == 400
    assert client.post("/classify", params={"r": "x"}, content=speech, headers={"Content-Type": "audio/wav"}).status_code == 422
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("fastast_requests_total", r="2", status="ok") == 2
    assert delta("fastast_requests_total", r="2", status="bad_request") == 1
    assert delta("fastast_requests_total", r="invalid", status="bad_request") == 1
    assert delta("fastast_samples_total", r="2") == 2
    assert delta("fastast_request_duration_seconds_count", r="2") == 3
    assert delta("fastast_queue_wait_seconds_count", r="2") == 2
    assert delta("fastast_inference_duration_seconds_count", r="2") == delta("fastast_batch_size_count", r="2") >= 1
    assert delta("fastast_batch_size_sum", r="2") == 2
    assert metric(after, "fastast_queue_depth", r="2") == 0
    # Stages: decode once per request in the workers (3 decoded, the junk one failed in it), fbank and model once
    # per batch in the engine; all processes' series come through the one /metrics.
    assert delta("fastast_stage_duration_seconds_count", stage="decode") == 2
    batches = delta("fastast_batch_size_count", r="2")
    assert delta("fastast_stage_duration_seconds_count", stage="fbank") == batches
    assert delta("fastast_stage_duration_seconds_count", stage="model") == batches
    assert 0 <= metric(after, "fastast_engine_busy_ratio") <= 1
    info = {labels: value for (name, labels), value in after.items() if name == "fastast_model_info"}
    assert list(info.values()) == [1.0]
    assert dict(next(iter(info))) == {"model": "tiny", "arch": "ast-64x4", "device": "cpu", "dtype": "fp32", "backend": "torch"}
    text = httpx.get(f"{server}/metrics").text
    assert 'fastast_request_duration_seconds_bucket{le="0.001",r="2"}' in text
    assert 'fastast_request_duration_seconds_bucket{le="30.0",r="2"}' in text
    assert "_created" not in text
