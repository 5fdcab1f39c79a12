"""``/readyz`` with a detail: once BentoML says the service is ready (200), the answer's body is JSON
saying which detector decides and what its calibration guarantees, so that whoever deploys a guard
sees how far its false-positive rate can be trusted::

    {"status": "ready", "guard": {"method": "logistic", "encoding": "rich",
     "threshold": 0.274..., "fpr": 0.05,
     "calibration": {"n": 199, "rank": 190, "marginal_bound": 0.05, "realised_bound": 0.0776,
                     "confidence": 0.95, "adequate": false, "needed": 240, "warning": "only 199 ...",
                     "summary": "..."}}}

(:mod:`nad_guard.calibration`); a guard with two detectors adds ``error_detector`` (the same for the
error detector) and ``decision`` (the rate and its split). ``deep`` says whether deep mode is available
(``?probes=K`` on ``/predict_with_trust``, :mod:`nad_guard.deep`): ``{"available": false}``, or
``{"available": true, "probes": K, "method", "threshold", "fpr", "calibration", "spec"}``. Any other answer of BentoML's (503 while starting) passes unchanged.
The detail is read once from the guard's meta.json (a guard without a ``calibration`` record gets it
computed from its calibration size and rate).
"""

from __future__ import annotations

import functools
import json
import typing as t

READYZ = "/readyz"


def _calibration(n: int, fpr: float, split: dict[str, t.Any]) -> dict[str, t.Any]:
    from nad_guard.calibration import fpr_guarantee

    g = fpr_guarantee(n, fpr, **split)  # split: nad_guard.provenance.exhausted_split(record)
    return {**{k: v for k, v in g.to_dict().items() if k != "rule"}, "summary": g.summary()}


def readiness_detail(detector: dict[str, t.Any], error_detector: dict[str, t.Any] | None = None,
                     decision: dict[str, t.Any] | None = None, deep: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    """The ``guard`` part of the ``/readyz`` body, from the ``detector`` record of a guard's meta.json; for a
    guard with two detectors (:mod:`nad_guard.errors`) also the ``error_detector`` record's method, threshold,
    rate and calibration, and the ``decision`` (the requested rate and its split)."""
    from nad_guard.provenance import exhausted_split

    split = exhausted_split(detector.get("provenance"))  # the three detectors share one calibration part
    out = {"method": detector.get("method"), "encoding": detector.get("encoding"),
           "threshold": detector.get("threshold"), "fpr": detector.get("fpr"),
           "calibration": _calibration(int((detector.get("calibration") or {}).get("n", detector.get(
               "calibration_clean"))), float(detector["fpr"]), split)}  # a re-saved loaded guard keeps only the record
    if error_detector is not None:
        out["error_detector"] = {"method": error_detector.get("method"), "threshold": error_detector.get("threshold"),
                                 "fpr": error_detector.get("fpr"),
                                 "calibration": _calibration(int(error_detector["calibration"]["n"]),
                                                             float(error_detector["fpr"]), split)}
        out["decision"] = decision
    out["deep"] = {"available": False}
    if isinstance(deep, dict):
        out["deep"] = {"available": True, "probes": int(deep["probes"]["k"]), "method": deep.get("method"),
                       "threshold": deep.get("threshold"), "fpr": deep.get("fpr"),
                       "calibration": _calibration(int(deep["calibration"]["n"]), float(deep["fpr"]), split),
                       "spec": deep["probes"]}
    return out


@functools.cache
def _body() -> bytes:
    from nad_guard.guard import read_guard_meta
    from service.loader import resolve_source

    try:
        meta = read_guard_meta(resolve_source().path)
        body = {"status": "ready", "guard": readiness_detail(meta["detector"], meta.get("error_detector"),
                                                             meta.get("decision"), meta.get("deep"))}
    except Exception as e:  # the service is ready whatever the detail: say why it is missing
        body = {"status": "ready", "guard": None, "detail_error": f"{type(e).__name__}: {e}"}
    return json.dumps(body).encode()


class ReadyDetail:
    """ASGI middleware: a 200 from ``/readyz`` gets :func:`readiness_detail` as its JSON body."""

    def __init__(self, app: t.Any, body: t.Callable[[], bytes] = _body) -> None:
        self.app, self.body = app, body

    async def __call__(self, scope: dict, receive: t.Any, send: t.Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != READYZ:
            return await self.app(scope, receive, send)
        state: dict[str, t.Any] = {}

        async def detail(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["ready"] = message["status"] == 200
                if not state["ready"]:
                    await send(message)
            elif not state.get("ready"):
                await send(message)
            elif not message.get("more_body", False):
                body = self.body()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, detail)
