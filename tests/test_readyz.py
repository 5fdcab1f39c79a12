"""``/readyz`` says what the served guard's calibration guarantees (service.readiness): the middleware on its
own (ASGI messages), and a real `bentoml serve` of the bundled guard."""

from __future__ import annotations

import json
import subprocess
import time

import anyio
import pytest
import requests

from nad_guard.guard import DEFAULT_GUARD_DIR, Guard
from service.readiness import ReadyDetail, readiness_detail
from test_service import BENTOML, ROOT, START_TIMEOUT, _env, _free_port, _stop


def _call(status: int, body: bytes = b"\n") -> list[dict]:
    """Run ReadyDetail around an app answering /readyz with ``status``; return the messages sent."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def main():
        await ReadyDetail(app, body=lambda: b'{"status": "ready"}')({"type": "http", "path": "/readyz"}, None, send)

    anyio.run(main)
    return sent


def test_the_detail_replaces_a_ready_answer_and_nothing_else():
    sent = _call(200)
    assert sent[0]["status"] == 200 and (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"status": "ready"}
    sent = _call(503, b"starting")  # not ready: BentoML's answer passes unchanged
    assert sent[0]["status"] == 503 and sent[1]["body"] == b"starting"


def test_the_detail_is_the_guards_calibration():
    guard = Guard.load(DEFAULT_GUARD_DIR)
    detail = readiness_detail(guard.meta["detector"])
    g = guard.detector.calibration()
    assert detail["threshold"] == guard.detector.threshold_ and detail["fpr"] == 0.05
    cal = detail["calibration"]
    assert (cal["n"], cal["rank"], cal["marginal_bound"], cal["realised_bound"]) == \
        (g.n, g.rank, g.marginal_bound, g.realised_bound) == (199, 190, 0.05, pytest.approx(0.0776, abs=1e-4))
    assert cal["adequate"] is False and "About 240" in cal["warning"] and cal["summary"] == g.summary()
    # its calibration part is 20% of mnist5k's whole test split: no larger sample to advise
    assert "whole test split (1,000 images) is already used" in cal["warning"] and "--max-images" not in cal["warning"]


def test_a_served_guard_says_its_calibration_on_readyz(tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([BENTOML, "serve", "service.service:NadGuard", "--host", "127.0.0.1", "--port",
                                 str(port)], cwd=ROOT, env=_env(tmp_path, NAD_GUARD_WORKERS="1"), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited at start-up:\n{_stop(proc, log)[-4000:]}")
            try:
                r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"the server was not ready after {START_TIMEOUT} s:\n{_stop(proc, log)[-4000:]}")
            time.sleep(0.5)
        body = r.json()
        assert r.headers["content-type"] == "application/json" and body["status"] == "ready"
        assert body["guard"] == json.loads(json.dumps(readiness_detail(Guard.load(DEFAULT_GUARD_DIR).meta["detector"])))
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        _stop(proc, log)
