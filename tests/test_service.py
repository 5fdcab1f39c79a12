"""The BentoML service for real: `bentoml serve` on a free loopback port, called over HTTP.

One server for the module (the bundled default guard, or ``$NAD_GUARD_TEST_GUARD_DIR`` if set),
with small limits (64 images, 4 MiB bodies) so the limit checks stay cheap. Plus: a corrupt guard
stops start-up, and `bentoml build` packs a guard from the model store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import typing as t
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image

from nad_guard.data import load_dataset
from nad_guard.guard import DEFAULT_GUARD_DIR, Guard
from nad_guard.models import InputSpec
from service.inputs import InputError, check_batch, decode_image, read_npy
from service.loader import GuardStartupError, Settings, resolve_source

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
GUARD_DIR = Path(os.environ.get("NAD_GUARD_TEST_GUARD_DIR") or DEFAULT_GUARD_DIR)
MAX_BATCH, MAX_BYTES = 64, 4 << 20
BODY_TIMEOUT_S = 5  # the test server's NAD_GUARD_BODY_TIMEOUT_S
START_TIMEOUT = 240  # 2 shared cores can be busy
WORKERS = 2  # serving processes of the test server (metrics and results must not depend on which answers)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NAD_GUARD_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(ROOT), **extra)
    if GUARD_DIR != DEFAULT_GUARD_DIR and "NAD_GUARD_MODEL_TAG" not in extra:
        env.setdefault("NAD_GUARD_DIR", str(GUARD_DIR))
    return env


def _stop(proc: subprocess.Popen, log: Path) -> str:
    """Stop a server we started, and its workers (circus gives them their own process groups); return
    its log."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for w in workers:  # normally already stopped by the server
        try:
            w.wait(10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            w.kill()
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@contextlib.contextmanager
def _serving(home: Path, log_name: str = "server.log", **env: str):
    """``(base URL, bentoml serve process, log file)`` of a server started with ``env``, stopped on exit."""
    port = _free_port()
    env = _env(home, **env)
    log = home / log_name  # kept in pytest's temporary directory
    with log.open("wb") as out:
        proc = subprocess.Popen([BENTOML, "serve", "service.service:NadGuard", "--host", "127.0.0.1", "--port",
                                 str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited at start-up:\n{_stop(proc, log)[-4000:]}")
            try:
                if requests.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            if time.time() > deadline:
                pytest.fail(f"the server was not ready after {START_TIMEOUT} s:\n{_stop(proc, log)[-4000:]}")
            time.sleep(0.5)
        yield base, proc, log
    finally:
        _stop(proc, log)


@pytest.fixture(scope="module")
def server(home):
    """``(base URL, bentoml serve process, log file)``, with two serving processes whatever the machine."""
    # FORWARD_ROWS 16: merged batches (up to 64 rows) run in several passes, as large ones do by default
    with _serving(home, NAD_GUARD_MAX_BATCH=str(MAX_BATCH), NAD_GUARD_MAX_REQUEST_BYTES=str(MAX_BYTES),
                  NAD_GUARD_FORWARD_ROWS="16", NAD_GUARD_WORKERS=str(WORKERS),
                  NAD_GUARD_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S)) as running:
        yield running


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard.load(GUARD_DIR)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("mnist5k")[1].float(0, 48).numpy()


def _post(url: str, path: str, **kwargs) -> requests.Response:
    return requests.post(url + path, timeout=60, **kwargs)


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _npy_body(data: bytes) -> dict:
    return {"data": data, "headers": {"Content-Type": "application/x-npy"}}


def _png(a: np.ndarray, mode: str = "L", size: tuple[int, int] | None = None, fmt: str = "PNG") -> bytes:
    img = Image.fromarray(np.round(a * 255).astype(np.uint8), "L").convert(mode)
    if size:
        img = img.resize(size, Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ happy paths
def test_json_batch_matches_the_library(url, guard, images):
    x = images[:16]
    with bentoml.SyncHTTPClient(url) as client:  # the client sends images as form data
        got = client.predict_with_trust(images=x.tolist())
    assert isinstance(got, list) and len(got) == 16
    want = guard.predict(torch.from_numpy(x))
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert (g["label"], g["class_name"], g["is_suspicious"], g["nearest_path_class"]) == \
               (w["label"], w["class_name"], w["is_suspicious"], w["nearest_path_class"])
        for key in ("confidence", "trust_score", "suspicion_score", "threshold"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key
        assert [lay["layer"] for lay in g["per_layer"]] == [lay["layer"] for lay in w["per_layer"]]
        assert all(0 <= lay["divergence"] <= 1 for lay in g["per_layer"])
        assert 0 < g["trust_score"] <= 1 and g["is_suspicious"] == (g["suspicion_score"] > g["threshold"])
    labels = np.array([g["label"] for g in got])
    assert (labels == load_dataset("mnist5k")[1].labels[:16].numpy()).mean() >= 0.9


def test_raw_json_and_plain_predict_agree(url, images):
    x = images[:10].tolist()
    trust = _post(url, "/predict_with_trust", json={"images": x})
    plain = _post(url, "/predict", json={"images": x})
    assert trust.status_code == plain.status_code == 200
    assert trust.headers["content-type"].startswith("application/json")
    for t, p in zip(trust.json(), plain.json()):
        assert set(p) == {"label", "class_name", "confidence"}
        assert (t["label"], t["class_name"]) == (p["label"], p["class_name"])
        assert t["confidence"] == pytest.approx(p["confidence"], abs=1e-6)


def test_image_upload_equals_the_same_pixels_as_json(url, images, tmp_path):
    x = images[3:4]
    want = _post(url, "/predict_with_trust", json={"images": x.tolist()}).json()
    for data, mime in ((_png(x[0, 0]), "image/png"), (_png(x[0, 0], "RGB"), "image/png"),
                       (_png(x[0, 0], "RGBA"), "application/octet-stream")):
        r = _post(url, "/predict_with_trust", files={"image": ("digit.png", data, mime)})
        assert r.status_code == 200, r.text
        assert r.json() == want  # grey, RGB and opaque RGBA PNGs of the same pixels: identical results
    path = tmp_path / "digit.png"
    path.write_bytes(_png(x[0, 0]))
    with bentoml.SyncHTTPClient(url) as client:
        assert client.predict_with_trust(image=path) == want


@pytest.mark.parametrize("path", ["/predict_with_trust", "/predict"])
def test_npy_input_equals_json_bit_for_bit(url, images, path, tmp_path):
    x = images[:10]
    want = _post(url, path, json={"images": x.tolist()})
    assert want.status_code == 200, want.text
    want = want.json()
    f32 = x.astype(np.float32)
    for name, kwargs in {
        "body": _npy_body(_npy(f32)),
        "body; charset": {"data": _npy(f32), "headers": {"Content-Type": "application/x-npy; charset=binary"}},
        "part": {"files": {"images_npy": ("batch.npy", _npy(f32), "application/octet-stream")}},
        "big-endian": _npy_body(_npy(f32.astype(">f4"))),
        "fortran order": _npy_body(_npy(np.asfortranarray(f32))),
    }.items():
        r = _post(url, path, **kwargs)
        assert r.status_code == 200, (name, r.text[:300])
        assert r.json() == want, name  # the same float32 pixels: identical results, bit for bit
    # uint8 is divided by 255 exactly as an uploaded image's pixels are
    u8 = np.round(images[3:4] * 255).astype(np.uint8)
    png = _post(url, path, files={"image": ("digit.png", _png(u8[0, 0] / 255.0))}).json()
    assert _post(url, path, **_npy_body(_npy(u8))).json() == png
    # and the BentoML client sends the file part
    batch = tmp_path / "batch.npy"
    batch.write_bytes(_npy(f32))
    with bentoml.SyncHTTPClient(url) as client:
        assert getattr(client, path.strip("/"))(images_npy=batch) == want


def test_larger_and_jpeg_images_are_resized(url, images):
    big = _png(images[5, 0], size=(112, 112))
    jpeg = _png(images[5, 0], "RGB", size=(56, 70), fmt="JPEG")
    want = _post(url, "/predict", json={"images": images[5:6].tolist()}).json()[0]["label"]
    for data in (big, jpeg):
        r = _post(url, "/predict_with_trust", files={"image": ("x", data)})
        assert r.status_code == 200, r.text
        assert len(r.json()) == 1 and r.json()[0]["label"] == want


def test_batched_and_single_results_are_identical_under_concurrency(url, images):
    x = images[:32]
    whole = _post(url, "/predict_with_trust", json={"images": x.tolist()}).json()

    def one(i: int) -> dict:
        r = _post(url, "/predict_with_trust", json={"images": x[i:i + 1].tolist()})
        assert r.status_code == 200, r.text
        return r.json()[0]

    with ThreadPoolExecutor(16) as pool:  # 128 calls: BentoML 1.4 used to drop some past 100 (see service.py)
        concurrent = list(pool.map(one, [i % 32 for i in range(128)]))
    sequential = [one(i) for i in (0, 7, 31)]
    assert concurrent == whole * 4  # bit for bit, whatever each input was batched with
    assert sequential == [whole[0], whole[7], whole[31]]
    # and the service did merge requests into batches
    hist = _series(requests.get(url + "/metrics", timeout=30).text, "bentoml_service_adaptive_batch_size")
    trust = {k: v for k, v in hist.items() if 'method_name="predict_with_trust"' in k}
    count = sum(v for k, v in trust.items() if k.startswith("bentoml_service_adaptive_batch_size_count"))
    ones = sum(v for k, v in trust.items() if 'le="1.0"' in k)
    assert count > ones, "no batch held more than one request"


def _series(text: str, prefix: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------------------ bad input
def _png_with_size(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    data = bytearray(_png(np.zeros((4, 4))))
    ihdr = bytearray(data[12:29])  # type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _json_text(text: str) -> dict:
    return {"data": text.encode(), "headers": {"Content-Type": "application/json"}}


Z = np.zeros((2, 1, 28, 28))
BAD = {
    "rank": ({"json": {"images": Z[0].tolist()}}, 400, r"shape \(1, 28, 28\); expected \(N, 1, 28, 28\)"),
    "channels": ({"json": {"images": np.zeros((1, 3, 28, 28)).tolist()}}, 400, r"3 channel.*takes 1 \(grey\)"),
    "size": ({"json": {"images": np.zeros((1, 1, 32, 32)).tolist()}}, 400, r"32x32.*takes 28x28"),
    "nan": (_json_text('{"images": [[[' + ",".join(["[" + ",".join(["NaN"] * 28) + "]"] * 28) + "]]]}"),
            400, "NaN or infinite"),
    "inf": (_json_text('{"images": [[[' + ",".join(["[" + ",".join(["1e999"] * 28) + "]"] * 28) + "]]]}"),
            400, "NaN or infinite"),
    "range": ({"json": {"images": (Z + 255).tolist()}}, 400, r"outside \[0, 1\]"),
    "negative": ({"json": {"images": (Z - 0.5).tolist()}}, 400, r"outside \[0, 1\]"),
    "empty": ({"json": {"images": []}}, 400, "empty batch"),
    "too_many": ({"json": {"images": np.zeros((MAX_BATCH + 1, 1, 28, 28), np.uint8).tolist()}}, 400,
                 f"{MAX_BATCH + 1} images, more than the limit of {MAX_BATCH}"),
    "strings": ({"json": {"images": [["a"]]}}, 400, "not numbers"),
    "ragged": ({"json": {"images": [[[[0.1] * 28] * 28], [[[0.1] * 3]]]}}, 400, "images"),
    "neither": ({"json": {}}, 400, "neither 'image', 'images' nor 'images_npy' given"),
    "both": ({"files": {"image": ("d.png", _png(np.zeros((28, 28)))), "images": (None, json.dumps(Z.tolist()))}},
             400, "both 'image' and 'images'"),
    "unknown_field": ({"json": {"imgs": Z.tolist()}}, 400, "unknown field.*'imgs'"),
    "bad_json": (_json_text('{"images": [1, 2'), 400, "not valid JSON"),
    "json_array_body": ({"json": Z.tolist()}, 400, "must be an object"),
    "image_in_json": ({"json": {"image": "aGVsbG8="}}, 400, "file part of a multipart"),
    "not_an_image": ({"files": {"image": ("d.png", b"%PDF-1.4 not an image at all")}}, 400, "not a PNG or JPEG"),
    "empty_file": ({"files": {"image": ("d.png", b"")}}, 400, "empty"),
    "truncated": ({"files": {"image": ("d.png", _png(np.random.default_rng(0).random((64, 64)))[:300])}}, 400,
                  "truncated or corrupt"),
    "bomb": ({"files": {"image": ("bomb.png", _png_with_size(20_000, 20_000))}}, 400,  # over Pillow's own guard too
             r"^the image is 400,000,000 pixels, more than the limit of 16,777,216 pixels \(NAD_GUARD_MAX_IMAGE_PIXELS\); "
             r"shrink it before uploading \(the model takes 28x28\)$"),
    "over_pixel_limit": ({"files": {"image": ("big.png", _png_with_size(5_000, 4_000))}}, 400,
                         "the image is 5000x4000 = 20,000,000 pixels, more than the limit of 16,777,216"),
    "image_as_text": ({"files": {"image": (None, "digit.png")}}, 400, "must be a file part"),
    "images_as_binary": ({"files": {"images": ("d.png", _png(np.zeros((28, 28))))}}, 400, "must be JSON text"),
    "two_images": ({"files": [("image", ("a.png", _png(np.zeros((28, 28))))),
                              ("image", ("b.png", _png(np.zeros((28, 28)))))]}, 400, "given 2 times"),
    "bad_multipart": ({"data": b"--x\r\nnot a part", "headers": {"Content-Type": "multipart/form-data"}}, 400,
                      "malformed multipart"),
    "empty_boundary": ({"data": b"--\r\n\r\n----\r\n", "headers": {"Content-Type": "multipart/form-data; boundary="}},
                       400, "malformed multipart/form-data body: the Content-Type header gives no boundary"),
    "unterminated_multipart": ({"data": b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
                                + _png(np.zeros((28, 28))), "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}},
                               400, "malformed multipart/form-data body: it does not end with its closing boundary '--xyz--'"),
    "duplicate_key": (_json_text('{"images": [], "images": ' + json.dumps(Z.tolist()) + "}"), 400,
                      "the JSON object gives the key 'images' more than once"),
    # .npy input (Content-Type: application/x-npy, or a multipart file part 'images_npy')
    "npy_float64": (_npy_body(_npy(Z)), 400, r"dtype float64.*float32 in \[0, 1\] or uint8"),
    "npy_int64": (_npy_body(_npy(Z.astype(np.int64))), 400, r"dtype int64"),
    "npy_bool": (_npy_body(_npy(Z.astype(bool))), 400, r"dtype bool"),
    "npy_rank": (_npy_body(_npy(Z[0].astype(np.float32))), 400, r"shape \(1, 28, 28\); expected \(N, 1, 28, 28\)"),
    "npy_size": (_npy_body(_npy(np.zeros((1, 1, 32, 32), np.float32))), 400, r"32x32.*takes 28x28"),
    "npy_channels": (_npy_body(_npy(np.zeros((1, 3, 28, 28), np.uint8))), 400, r"3 channel.*takes 1 \(grey\)"),
    "npy_nan": (_npy_body(_npy(np.full((1, 1, 28, 28), np.nan, np.float32))), 400, "NaN or infinite"),
    "npy_range": (_npy_body(_npy((Z + 255).astype(np.float32))), 400, r"outside \[0, 1\]"),
    "npy_empty_batch": (_npy_body(_npy(np.zeros((0, 1, 28, 28), np.float32))), 400, "empty batch"),
    "npy_too_many": (_npy_body(_npy(np.zeros((MAX_BATCH + 1, 1, 28, 28), np.uint8))), 400,
                     f"{MAX_BATCH + 1} images, more than the limit of {MAX_BATCH}"),
    "npy_truncated": (_npy_body(_npy(Z.astype(np.float32))[:-100]), 400, r"\.npy data is truncated"),
    "npy_trailing": (_npy_body(_npy(Z.astype(np.float32)) + b"\0" * 4), 400, "followed by extra bytes"),
    "npy_garbage": (_npy_body(b"PK\x03\x04 this is a zip, not a .npy"), 400, r"not a \.npy file"),
    "npy_empty": (_npy_body(b""), 400, r"\.npy data is empty"),
    "npy_bad_header": (_npy_body(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4 }  \n"), 400, "header is malformed"),
    "npy_long_header": (_npy_body(b"\x93NUMPY\x01\x00" + struct.pack("<H", 60_000) + b" " * 60_000), 400,
                        r"the \.npy header says it is 60,000 bytes long; at most 10,000 are read"),
    "npy_pickled": (_npy_body(_npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)), 400,
                    r"dtype object.*never unpickled"),
    "npy_records": (_npy_body(_npy(np.zeros((1, 1, 28, 28), [("a", "f4"), ("b", "u1")]))), 400, "records"),
    "npy_part_pickled": ({"files": {"images_npy": ("x.npy", _npy(np.array([1, "a"], dtype=object), True))}},
                         400, "never unpickled"),
    "npy_part_as_text": ({"files": {"images_npy": (None, "1,2,3")}}, 400, "'images_npy' must be a file part"),
    "npy_in_json": ({"json": {"images_npy": "aGVsbG8="}}, 400, "'images_npy' must be a file part"),
    "npy_and_images": ({"files": {"images": (None, json.dumps(Z.tolist())),
                                  "images_npy": ("x.npy", _npy(Z.astype(np.float32)))}}, 400,
                       "both 'images' and 'images_npy'"),
    "content_type": ({"data": b"images=1", "headers": {"Content-Type": "text/plain"}}, 415,
                     "unsupported Content-Type 'text/plain'"),
    "too_large": ({"data": b"x" * (MAX_BYTES + 1), "headers": {"Content-Type": "application/json"}}, 413,
                  "larger than the limit"),
}


@pytest.mark.parametrize("path", ["/predict_with_trust", "/predict"])
def test_bad_input_is_a_client_error_with_a_useful_message(server, path):
    url, _, log = server
    logged = len(log.read_bytes())
    for name, (kwargs, status, pattern) in BAD.items():
        r = _post(url, path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        body = r.json()
        assert isinstance(body, list) and len(body) == 1 and set(body[0]) == {"error"}, (name, body)
        assert re.search(pattern, body[0]["error"]), (name, body[0]["error"])
        assert "allow_pickle" not in body[0]["error"] and "178,956,970" not in body[0]["error"], name  # our words
    # still up, and still right
    assert requests.get(url + "/healthz", timeout=10).status_code == 200
    r = _post(url, path, json={"images": Z.tolist()})
    assert r.status_code == 200 and len(r.json()) == 2
    # each refusal is one line at WARNING with its reason: no traceback, nothing at ERROR
    new = _log_lines(log, logged, f"refused POST {path} from", len(BAD))
    refusals = [line for line in new if f"refused POST {path} from" in line]
    assert len(refusals) == len(BAD) and all("[WARNING]" in line for line in refusals), refusals[:3]
    assert any("images are 32x32 (shape (1, 1, 32, 32)); this model takes 28x28" in line for line in refusals)
    assert not [line for line in new if "Traceback" in line or "[ERROR]" in line]


def _log_lines(log: Path, start: int, marker: str, count: int) -> list[str]:
    """The server log's lines after byte ``start``, once ``count`` of them hold ``marker`` (the workers'
    output reaches the file through the server process, a moment later) or 10 s have passed."""
    deadline = time.time() + 10
    while True:
        lines = log.read_bytes()[start:].decode(errors="replace").splitlines()
        if sum(marker in line for line in lines) >= count or time.time() > deadline:
            return lines
        time.sleep(0.2)


def _scrapes(url: str, n: int = 6) -> list[str]:
    """``n`` scrapes of /metrics, each on a new connection (so not always from the same worker)."""
    return [requests.get(url + "/metrics", timeout=30, headers={"Connection": "close"}).text for _ in range(n)]


def test_metrics_have_the_default_and_custom_series(server, images):
    url, proc, _ = server
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--service-name" in p.cmdline()]
    assert len(workers) == WORKERS
    before = sum(_series(_scrapes(url, 1)[0], "nad_guard_predictions_total").values())
    noise = np.random.default_rng(1).random((4, 1, 28, 28))
    batch = np.concatenate([images[:4], noise]).tolist()
    with ThreadPoolExecutor(8) as pool:  # 8 requests at once: both workers take some
        assert all(r.ok for r in pool.map(lambda _: _post(url, "/predict_with_trust", json={"images": batch}), range(8)))
    assert _post(url, "/predict_with_trust", json={"images": [[1]]}).status_code == 400
    scrapes = _scrapes(url)
    totals = [sum(_series(t, "nad_guard_predictions_total").values()) for t in scrapes]
    # every worker's /metrics counts every worker's predictions (BentoML's multiprocess registry)
    assert totals == [before + 8 * 8] * len(scrapes)
    text = scrapes[0]
    predictions = _series(text, "nad_guard_predictions_total")
    assert _series(text, "nad_guard_flagged_total")  # one series per class, zero or not
    assert _series(text, "nad_guard_trust_score_count")[
        "nad_guard_trust_score_count"] == sum(predictions.values())
    assert 'nad_guard_trust_score_bucket{le="0.05"}' in text
    assert _series(text, 'nad_guard_refused_requests_total{endpoint="predict_with_trust",status="400"}')
    assert "bentoml_service_request_total" in text and 'endpoint="/predict_with_trust"' in text
    assert requests.get(url + "/readyz", timeout=10).status_code == 200


# ------------------------------------------------------------------------------------ hostile traffic
TEST_LIMITS = {"application/x-npy": 12 + 10_000 + 64 * 784 * 4,  # .npy header allowance + float32 values
               "application/json": 64 * 784 * 32 + 4096,  # 32 bytes a value
               "multipart/form-data": 4 << 20}  # an image file's 16,777,216 bytes, capped by MAX_BYTES


def _raw(url: str, head: bytes, body_chunks: t.Iterable[bytes] = (), pause: float = 0.0) -> tuple[int, bytes, bool]:
    """Send ``head`` (request line and headers) then ``body_chunks`` on one connection, ``pause`` s apart,
    until the server answers; returns (status, the answer until the server closed, whether it closed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head)
        sock.settimeout(pause or 60)
        for chunk in body_chunks:
            try:  # an answer already? then the server has stopped reading
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(60)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
            closed = True
        except TimeoutError:
            closed = False
        except ConnectionResetError:
            closed = True
    return int(data.split(b" ", 2)[1]), data, closed


def _head(path: str, content_type: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: {content_type}"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += ["Transfer-Encoding: chunked"] if chunked else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_body_limits_follow_the_media_type_and_are_enforced_before_reading(url, images):
    spec = InputSpec(1, 28, 28, (0.5,), (0.5,), [str(i) for i in range(10)])
    limits = Settings(max_batch=MAX_BATCH, max_request_bytes=MAX_BYTES).body_limits(spec)
    assert {k: limits[k] for k in TEST_LIMITS} == TEST_LIMITS == {
        "application/x-npy": 210_716, "application/json": 1_609_728, "multipart/form-data": 4_194_304}
    assert Settings().body_limits(spec)["application/x-npy"] == 812_828  # the defaults: 256 images
    assert Settings().body_limits(spec)["application/json"] == 6_426_624
    # the largest valid .npy request is accepted; one byte over the .npy limit is not, JSON of that size is
    full = _npy(np.repeat(images[:1], MAX_BATCH, 0).astype(np.float32))
    assert len(full) <= TEST_LIMITS["application/x-npy"]
    assert _post(url, "/predict", **_npy_body(full)).status_code == 200
    over = TEST_LIMITS["application/x-npy"] + 1
    r = _post(url, "/predict", **_npy_body(full + b"\0" * (over - len(full))))
    assert r.status_code == 413 and "limit of 210,716 bytes for application/x-npy" in r.json()[0]["error"]
    padded = json.dumps({"images": images[:2].tolist()}).encode()
    padded += b" " * (over - len(padded))
    assert _post(url, "/predict", **{"data": padded, "headers": {"Content-Type": "application/json"}}).status_code == 200
    # refused from Content-Length alone, before a byte of the body (else: 408 after the body timeout), and closed
    for media, limit in TEST_LIMITS.items():
        status, answer, closed = _raw(url, _head("/predict", media, limit + 1))
        assert (status, closed) == (413, True), (media, answer[:300])
        assert f"limit of {limit:,} bytes for {media}".encode() in answer
    # a chunked body (no Content-Length) is cut off once it passes the limit
    chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
    status, answer, closed = _raw(url, _head("/predict", "application/x-npy", chunked=True), [chunk] * 8, pause=0.3)
    assert (status, closed) == (413, True), answer[:300]
    # the limits are in the API document
    doc = requests.get(url + "/docs.json", timeout=30).json()
    text = doc["paths"]["/predict"]["post"]["requestBody"]["description"]
    assert "application/json 1,609,728 bytes" in text and "application/x-npy 210,716 bytes" in text


def test_slow_clients_get_408_and_are_disconnected(url):
    head = _head("/predict", "application/x-npy", 1000)
    status, answer, closed = _raw(url, head)  # headers, then nothing
    assert (status, closed) == (408, True), answer[:300]
    assert b"did not arrive within 5 s (0 bytes received" in answer
    # a client trickling a byte a second is cut off too: the limit is on the whole body, not between reads
    status, answer, closed = _raw(url, head, [b"\x93"] * (BODY_TIMEOUT_S + 5), pause=1.0)
    assert (status, closed) == (408, True), answer[:300]
    assert re.search(rb"within 5 s \([1-9] bytes received", answer), answer[-200:]
    assert requests.get(url + "/healthz", timeout=10).status_code == 200


def test_unknown_routes_share_one_series(url):
    def size_and_unknown() -> tuple[int, float]:
        text = _scrapes(url, 1)[0]
        return len(text), _series(text, "nad_guard_unknown_route_requests_total").get(
            "nad_guard_unknown_route_requests_total", 0.0)

    before, unknown0 = size_and_unknown()
    rng = np.random.default_rng(17)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789-_.~")
    paths = ["/" + "".join(rng.choice(alphabet, 16)) for _ in range(900)]
    paths += ["/static_content/" + "".join(rng.choice(alphabet, 12)) for _ in range(50)]  # under the UI's files
    paths += ["/predict_with_trust/" + "".join(rng.choice(alphabet, 8)) for _ in range(50)]
    with requests.Session() as session:
        answers = [session.get(url + p, timeout=30) for p in paths]
    assert all(r.status_code == 404 for r in answers)
    assert answers[0].json() == [{"error": f"no such route '{paths[0]}'; the service serves POST /predict, "
                                           "/predict_with_trust (see /docs.json)"}]
    after, unknown1 = size_and_unknown()
    assert unknown1 - unknown0 == 1000  # counted once each, in one series summed over both workers
    assert after <= 2 * before, (before, after)
    assert all(p not in _scrapes(url, 1)[0] for p in paths[:20])
    assert requests.get(url + "/docs.json", timeout=30).status_code == 200  # served routes still are
    assert requests.get(url + "/", timeout=30).status_code == 200


def _worker_rss(proc: subprocess.Popen) -> dict[int, int]:
    return {p.pid: p.memory_info().rss for p in psutil.Process(proc.pid).children(recursive=True)
            if "--service-name" in p.cmdline()}


def test_huge_images_are_refused_or_decoded_in_bounded_memory(server, images):
    url, proc, _ = server
    small = _png(images[0, 0])
    for _ in range(8):  # warm both workers' image path
        assert _post(url, "/predict", files={"image": ("d.png", small)}).status_code == 200
    start = _worker_rss(proc)

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGBA", (side, side), (255, 255, 255, 255)).save(buf, "PNG")
        return buf.getvalue()

    huge, at_limit = png(7000), png(4096)  # 49 M pixels (the 208 KB file), and 16.8 M: the limit
    for _ in range(20):
        r = _post(url, "/predict", files={"image": ("huge.png", huge)})
        assert r.status_code == 400 and "7000x7000 = 49,000,000 pixels, more than the limit" in r.json()[0]["error"]
    want = _post(url, "/predict", json={"images": np.ones((1, 1, 28, 28)).tolist()}).json()
    for _ in range(20):
        r = _post(url, "/predict", files={"image": ("big.png", at_limit)})
        assert r.status_code == 200 and r.json() == want  # all white, whatever the size
    end = _worker_rss(proc)
    assert set(end) == set(start)
    for pid, rss in start.items():
        assert end[pid] <= 1.10 * rss, (pid, rss >> 20, end[pid] >> 20)


def test_the_api_document_passes_schemathesis(url, tmp_path):
    """Schemathesis (all checks) against the live server: every request the document calls valid is
    accepted, every invalid one refused with a documented 4xx, every answer matches its schema. Its
    hooks generate the bodies JSON Schema cannot describe (.npy, image files, JSON text in a form)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
           "NAD_GUARD_TEST_SPEC": f"1,28,28,{MAX_BATCH}"}
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{url}/docs.json", "--checks", "all", "--max-examples", "25",
                        "--seed", "17", "--request-timeout", "60", "--no-color"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert re.search(r"Tested:\s+6", out) and re.search(r"\d+ generated, \d+ passed", out), out[-3000:]
    assert "failure" not in out.split("SUMMARY")[-1].lower(), out[-3000:]


def test_an_api_key_locks_all_but_the_probes(home, tmp_path, images):
    key = "k3y-" + "x" * 28
    auth = {"Authorization": f"Bearer {key}"}
    x = images[:2].tolist()
    with _serving(home, "server_key.log", NAD_GUARD_API_KEY=key, NAD_GUARD_WORKERS="1") as (url, _, log):
        for path in ("/predict", "/predict_with_trust", "/metrics", "/docs.json", "/schema.json", "/nope"):
            for headers in ({}, {"Authorization": "Bearer " + "y" * 32}, {"Authorization": f"Basic {key}"}):
                r = requests.request("POST" if path.startswith("/predict") else "GET", url + path, headers=headers,
                                     json={"images": x}, timeout=30)
                assert r.status_code == 401, (path, headers, r.status_code)
                assert r.headers["www-authenticate"] == 'Bearer realm="nad-guard"'
                assert "needs an API key" in r.json()[0]["error"]
        for path in ("/healthz", "/livez", "/readyz"):
            assert requests.get(url + path, timeout=30).status_code == 200
        assert requests.post(url + "/predict", json={"images": x}, headers=auth, timeout=30).status_code == 200
        assert requests.get(url + "/metrics", headers=auth, timeout=30).status_code == 200
        doc = requests.get(url + "/docs.json", headers=auth, timeout=30).json()
        assert doc["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
        assert "401" in doc["paths"]["/metrics"]["get"]["responses"]
        with bentoml.SyncHTTPClient(url, token=key) as client:  # BentoML's client sends the same header
            assert [p["label"] for p in client.predict(images=x)] == [
                p["label"] for p in requests.post(url + "/predict", json={"images": x}, headers=auth, timeout=30).json()]
        assert key not in log.read_text(errors="replace")
    key_file = tmp_path / "key.txt"
    key_file.write_text(key + "\n")
    two = _two_detector_guard(tmp_path / "two_guard", images)  # this server also serves a guard with both detectors
    with _serving(home, "server_key_file.log", NAD_GUARD_API_KEY_FILE=str(key_file), NAD_GUARD_METRICS_AUTH="0",
                  NAD_GUARD_WORKERS="1", NAD_GUARD_DIR=str(two.meta_dir)) as (url, _, _):
        assert requests.get(url + "/metrics", timeout=30).status_code == 200  # open by setting
        assert requests.post(url + "/predict", json={"images": x}, timeout=30).status_code == 401
        assert requests.post(url + "/predict", json={"images": x}, headers=auth, timeout=30).status_code == 200
        got = requests.post(url + "/predict_with_trust", json={"images": x}, headers=auth, timeout=30).json()
        want = two.predict(torch.from_numpy(images[:2]))
        for g, w in zip(got, want):
            assert set(g) == set(w) >= {"attack_p_value", "error_p_value", "error_score", "error_threshold"}
            for k in ("trust_score", "attack_p_value", "error_p_value", "error_score"):
                assert g[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), k
            assert g["trust_score"] == pytest.approx(min(1, 2 * min(g["attack_p_value"], g["error_p_value"])))
            assert g["is_suspicious"] == w["is_suspicious"]
        assert "security" not in requests.get(url + "/docs.json", headers=auth, timeout=30).json()["paths"]["/metrics"]["get"]


def test_deep_mode_is_a_per_request_option(home, tmp_path, images):
    """?probes=K on /predict_with_trust (nad_guard.deep): the deep detector's records with both p-values,
    equal to the library's; other values, and deep requests over NAD_GUARD_MAX_BATCH // (K + 1) images, are
    refused before any work; the deep endpoint's own route is not served; /readyz and /docs.json say K."""
    from nad_guard.deep import deep_rows
    from nad_guard.detectors import PathDetector
    from nad_guard.probes import ProbeSpec

    g = _two_detector_guard(tmp_path / "deep_guard", images)
    spec = ProbeSpec(k=8)
    rows = deep_rows(g.paths, load_dataset("mnist5k")[1].float(48, 448), g.encoding, spec, 16)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 240 calibration rows
        g.deep_detector, g.probes = PathDetector("gaussian").fit(rows).infer_threshold(rows, fpr=0.05), spec
    g.save(g.meta_dir)
    x = images[:3]
    with _serving(home, "server_deep.log", NAD_GUARD_DIR=str(g.meta_dir), NAD_GUARD_WORKERS="1",
                  NAD_GUARD_MAX_BATCH="32") as (url, _, _):  # deep: at most 32 // 9 = 3 images a request
        deep = requests.get(url + "/readyz", timeout=30).json()["guard"]["deep"]
        assert deep["available"] is True and deep["probes"] == 8 and deep["spec"] == spec.to_dict()
        got = _post(url, "/predict_with_trust?probes=8", json={"images": x.tolist()})
        assert got.status_code == 200, got.text
        want = g.run(torch.from_numpy(x), deep=True).records(g.classifier.class_names)
        for r, w in zip(got.json(), want):
            assert r["mode"] == "deep" and r["probes"] == 8 and set(r) == set(w)
            for k in ("trust_score", "suspicion_score", "attack_p_value", "error_p_value", "threshold"):
                assert r[k] == pytest.approx(w[k], rel=1e-5, abs=1e-6), k
        npy = _post(url, "/predict_with_trust?probes=8", **_npy_body(_npy(x)))
        assert [r["suspicion_score"] for r in npy.json()] == [r["suspicion_score"] for r in got.json()]
        single = _post(url, "/predict_with_trust", json={"images": x.tolist()}).json()
        assert "mode" not in single[0] and single[0]["threshold"] == g.detector.threshold_
        assert _post(url, "/predict_with_trust?probes=0", json={"images": x.tolist()}).json() == single
        for query, says in (("probes=3", "allowed values are 0 or 8"), ("probes=8&probes=8", "given 2 times"),
                            ("probes=x", "allowed values are 0 or 8")):
            r = _post(url, f"/predict_with_trust?{query}", json={"images": x.tolist()})
            assert r.status_code == 400 and says in r.json()[0]["error"], (query, r.text)
        r = _post(url, "/predict?probes=8", json={"images": x.tolist()})
        assert r.status_code == 400 and "option of /predict_with_trust only" in r.json()[0]["error"]
        four = images[:4]  # one image more than a deep request may hold: refused before the model
        r = _post(url, "/predict_with_trust?probes=8", json={"images": four.tolist()})
        assert r.status_code == 400 and "more than the limit of 3" in r.json()[0]["error"] \
            and "deep mode" in r.json()[0]["error"]
        r = _post(url, "/predict_with_trust?probes=8", **_npy_body(_npy(four)))
        assert r.status_code == 400 and "more than the limit of 3" in r.json()[0]["error"]
        ten = _npy(images[:10])  # over the deep body limit (3 images): 413 before the body is read
        r = _post(url, "/predict_with_trust?probes=8", **_npy_body(ten))
        assert r.status_code == 413 and "deep mode" in r.json()[0]["error"]
        assert _post(url, "/predict_with_trust", **_npy_body(ten)).status_code == 200  # 10 rows single-pass: fine
        assert _post(url, "/predict_with_trust_deep", json={"images": x.tolist()}).status_code == 404
        doc = requests.get(url + "/docs.json", timeout=30).json()
        assert "/predict_with_trust_deep" not in doc["paths"]
        (param,) = doc["paths"]["/predict_with_trust"]["post"]["parameters"]
        assert param["name"] == "probes" and param["schema"]["enum"] == [0, 8]


def _two_detector_guard(out: Path, images: np.ndarray) -> Guard:
    """The bundled guard plus an error detector (DOCTOR's score, calibrated on mnist5k test images 48-447, at
    the default share: 0.05 for each detector), saved to ``out``; ``.meta_dir`` is ``out``."""
    from nad_guard.encoding import detector_input
    from nad_guard.errors import ErrorDetector, error_rows

    g = Guard.load(GUARD_DIR)
    f, X = detector_input(g.paths, load_dataset("mnist5k")[1].float(48, 448), g.encoding)
    rows = error_rows(f.logits, X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer than 240 calibration rows
        g.error_detector = ErrorDetector("doctor").fit(rows).infer_threshold(rows, fpr=0.05)
    g.save(out)
    g.meta_dir = out
    return g


def test_api_key_settings_fail_clearly(tmp_path):
    assert Settings.from_env({}).api_key == ""
    assert Settings.from_env({"NAD_GUARD_API_KEY": "a" * 16}).api_key == "a" * 16
    assert "a" * 16 not in repr(Settings.from_env({"NAD_GUARD_API_KEY": "a" * 16}))
    with pytest.raises(GuardStartupError, match="at least 16 visible ASCII characters"):
        Settings.from_env({"NAD_GUARD_API_KEY": "short"})
    with pytest.raises(GuardStartupError, match="set only one"):
        Settings.from_env({"NAD_GUARD_API_KEY": "a" * 16, "NAD_GUARD_API_KEY_FILE": "x"})
    with pytest.raises(GuardStartupError, match="cannot read the key"):
        Settings.from_env({"NAD_GUARD_API_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(GuardStartupError, match="the file is empty"):
        Settings.from_env({"NAD_GUARD_API_KEY_FILE": str(tmp_path / "empty")})
    assert Settings.from_env({"NAD_GUARD_METRICS_AUTH": "0"}).metrics_auth is False
    with pytest.raises(GuardStartupError, match="NAD_GUARD_BODY_TIMEOUT_S=0.0 must be a positive number"):
        Settings.from_env({"NAD_GUARD_BODY_TIMEOUT_S": "0"})


# ------------------------------------------------------------------------------------ start-up, build
def test_a_corrupt_guard_stops_start_up_with_a_clear_message(home, tmp_path):
    broken = tmp_path / "broken_guard"
    shutil.copytree(GUARD_DIR, broken)
    (broken / "detector.skops").write_bytes(b"not a skops file")
    env = _env(home, NAD_GUARD_DIR=str(broken))
    r = subprocess.run([BENTOML, "serve", "service.service:NadGuard", "--host", "127.0.0.1", "--port",
                        str(_free_port())], cwd=ROOT, env=env, capture_output=True, timeout=START_TIMEOUT)
    log = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode != 0
    assert f"cannot load the guard from NAD_GUARD_DIR={broken}" in log and "detector.skops" in log


def test_bentoml_build_packs_the_service_and_a_stored_guard(home):
    env = _env(home)
    env.pop("NAD_GUARD_DIR", None)
    stored = subprocess.run([sys.executable, "-m", "service.store", str(GUARD_DIR), "--name", "test-guard"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert stored.returncode == 0, stored.stderr[-2000:]
    tag = stored.stdout.strip().splitlines()[-1]
    assert tag.startswith("test-guard:")
    build = subprocess.run([BENTOML, "build", "--output", "tag"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "NAD_GUARD_MODEL_TAG": "test-guard:latest"}, timeout=300)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    bento_dirs = [p for p in (home / "bentos" / "nad-guard").iterdir() if p.is_dir()]  # beside the `latest` file
    assert len(bento_dirs) == 1, bento_dirs
    bento_dir = bento_dirs[0]
    src = bento_dir / "src"
    assert (src / "service" / "service.py").is_file() and (src / "nad_guard" / "guard.py").is_file()
    assert (src / "nad_guard" / "default_guard" / "meta.json").is_file()
    assert not list(src.rglob("__pycache__"))
    assert tag in (bento_dir / "bento.yaml").read_text()  # the stored guard travels with the bento
    assert (home / "models" / "test-guard").is_dir()


# ------------------------------------------------------------------------------------ pieces, no server
SPEC = InputSpec(1, 28, 28, (0.5,), (0.5,), [str(i) for i in range(10)])


def test_decode_image_conversions():
    a = np.zeros((10, 20), np.uint8)
    a[2:8, 5:15] = 255
    grey = decode_image(_png(a / 255.0), SPEC, 10_000)
    assert grey.shape == (1, 1, 28, 28) and grey.dtype == np.float32 and grey.max() == 1.0 and grey.min() == 0.0
    rgb = InputSpec(3, 8, 8, (0.5,) * 3, (0.5,) * 3, ["a", "b"])
    assert decode_image(_png(a / 255.0), rgb, 10_000).shape == (1, 3, 8, 8)
    transparent = Image.new("RGBA", (28, 28), (255, 255, 255, 0))  # white but fully transparent
    buf = io.BytesIO()
    transparent.save(buf, "PNG")
    assert decode_image(buf.getvalue(), SPEC, 10_000).max() == 0.0  # composited onto black
    deep = Image.fromarray(np.full((28, 28), 65535, np.uint16))  # 16-bit grey
    buf = io.BytesIO()
    deep.save(buf, "PNG")
    assert decode_image(buf.getvalue(), SPEC, 10_000).min() == 1.0
    with pytest.raises(InputError, match="more than the limit"):
        decode_image(_png(a / 255.0), SPEC, 199)


def test_check_batch_accepts_only_the_exact_shape_and_range():
    x = check_batch(np.zeros((2, 1, 28, 28), np.int64).tolist(), SPEC, 4)
    assert x.dtype == np.float32 and x.shape == (2, 1, 28, 28)
    with pytest.raises(InputError, match="one image: wrap it in a list"):
        check_batch(np.zeros((1, 28, 28)), SPEC, 4)
    with pytest.raises(InputError, match="booleans"):
        check_batch(np.zeros((1, 1, 28, 28), bool), SPEC, 4)


class _Boom:
    """Unpickling this would create a file: .npy object arrays must never be unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_read_npy_never_unpickles_nor_trusts_the_header(tmp_path):
    x = np.random.default_rng(0).random((3, 1, 28, 28)).astype(np.float32)
    assert np.array_equal(read_npy(_npy(x), SPEC, 4), x)
    u8 = (x * 255).astype(np.uint8)
    assert np.array_equal(read_npy(_npy(u8), SPEC, 4), u8.astype(np.float32) / 255.0)
    marker = tmp_path / "unpickled"
    with pytest.raises(InputError, match="never unpickled"):
        read_npy(_npy(np.array([_Boom(str(marker))], dtype=object), allow_pickle=True), SPEC, 4)
    assert not marker.exists()
    # a header claiming a huge array over a few bytes of data: refused without allocating it
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False,
                                               "shape": (10**9, 1, 28, 28)})
    with pytest.raises(InputError, match=r"truncated.*3,136,000,000,000 bytes"):
        read_npy(buf.getvalue() + b"\0" * 64, SPEC, 4)


def test_settings_and_sources_fail_clearly(tmp_path):
    with pytest.raises(GuardStartupError, match="set only one"):
        resolve_source({"NAD_GUARD_MODEL_TAG": "a:b", "NAD_GUARD_DIR": str(tmp_path)})
    with pytest.raises(GuardStartupError, match="NAD_GUARD_MAX_BATCH='many' is not an integer"):
        Settings.from_env({"NAD_GUARD_MAX_BATCH": "many"})
    assert resolve_source({}).path == DEFAULT_GUARD_DIR
    assert Settings.from_env({"NAD_GUARD_MAX_BATCH": "32"}).max_batch == 32
    with pytest.raises(GuardStartupError, match="NAD_GUARD_FORWARD_ROWS=0 must be at least 1"):
        Settings.from_env({"NAD_GUARD_FORWARD_ROWS": "0"})


def test_worker_and_thread_counts():
    auto = Settings.from_env({})
    assert (auto.workers, auto.torch_threads) == (0, 0)
    # auto: two processes with a core each on 2 cores; one process with all cores on 1
    assert auto.workers_for(2) == 2 and auto.threads_for(2, 2) == 1
    assert auto.workers_for(1) == 1 and auto.threads_for(1, 1) == 1
    assert auto.workers_for(16) == 2 and auto.threads_for(16, 2) == 8
    assert auto.threads_for(16, 1) == 15 and auto.threads_for(2, 1) == 2  # one process: a core left to HTTP past 2
    assert Settings(device="cuda").workers_for(16) == 1  # one process holds the GPU
    fixed = Settings.from_env({"NAD_GUARD_WORKERS": "3", "NAD_GUARD_TORCH_THREADS": "2"})
    assert fixed.workers_for(2) == 3 and fixed.threads_for(2, 3) == 2
    with pytest.raises(GuardStartupError, match="NAD_GUARD_WORKERS='two' is not an integer"):
        Settings.from_env({"NAD_GUARD_WORKERS": "two"})


def test_forward_passes_are_whole_multiples_of_the_padding():
    from nad_guard.guard import forward_step

    d = Settings()
    assert forward_step(d.forward_rows, d.pad_multiple) == 128
    assert forward_step(100, 8) == 96
    assert forward_step(5, 8) == 8
    assert forward_step(5, 1) == 5


def test_timeout_middleware_releases_each_request_at_once():
    """BentoML 1.4's TimeoutMiddleware kept every request's context alive for `timeout` seconds."""
    import asyncio

    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service import bentoml_fixes

    assert bentoml_fixes.apply()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        pass

    async def main() -> list:
        mw = TimeoutMiddleware(app, timeout=120)
        for _ in range(20):
            await mw({"type": "http"}, None, send)
        loop = asyncio.get_running_loop()
        return [h for h in loop._scheduled if not h.cancelled() and h.when() - loop.time() > 60]

    assert asyncio.run(main()) == []


def test_batching_wait_learned_under_load_is_capped():
    """BentoML 1.4 learns its batching wait from the last batches' waits, which under saturation are
    queueing time: after a burst every lone request was held back about that long (270-540 ms
    measured). The service caps it at NAD_GUARD_BATCH_WAIT_MS."""
    from bentoml._internal.marshal.dispatcher import Optimizer

    from service import bentoml_fixes

    def learned(cap_s: float | None) -> float:
        if cap_s is not None:
            assert bentoml_fixes.cap_batching_wait(cap_s)
        opt = Optimizer(max_latency=10.0)
        for n in range(1, 40):  # saturated: each batch's first request queued 0.4 s behind the model
            opt.log_outbound(n=n, wait=0.4, duration=0.01 * n)
        opt.trigger_refresh()
        return opt.wait

    import service.service  # noqa: F401  (the service applies the default cap on import)

    assert Settings().batch_wait_ms == 5
    assert learned(None) == pytest.approx(0.005)
    assert learned(0.0) == 0.0
    assert learned(10.0) == pytest.approx(0.4)  # a cap above the learned wait changes nothing
    assert bentoml_fixes.cap_batching_wait(0.005)
    assert learned(None) == pytest.approx(0.005)
    assert Settings.from_env({"NAD_GUARD_BATCH_WAIT_MS": "0"}).batch_wait_ms == 0
    with pytest.raises(GuardStartupError, match="NAD_GUARD_BATCH_WAIT_MS=-1 must be at least 0"):
        Settings.from_env({"NAD_GUARD_BATCH_WAIT_MS": "-1"})
