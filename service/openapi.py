"""The service's OpenAPI document (``/docs.json``), as the gate (:mod:`service.gate`) serves it.

BentoML 1.4 describes a prediction route by its input model alone (a multipart form, with an
``images`` field that no client could send), documents its errors as objects although it answers
4xx as ``[{"error": ...}]``, and leaves out 401, 408, 413, 415 and 503. :func:`document` takes
BentoML's document and describes, for each prediction route, every body the gate accepts (JSON,
.npy, multipart with exactly one part, a URL-encoded form) with this model's shape and the service's
limits, and every answer it gives; and the infrastructure routes with their media types and, when a
key is set, which need it. The 200 answer's schema is kept as BentoML derives it from
``service.service.TrustPrediction``: ``attack_p_value``, ``error_p_value``, ``error_score`` and
``error_threshold`` are optional there (present only when the guard has an error detector,
:mod:`nad_guard.errors`), the other fields required. Checked against the running server by Schemathesis
(tests/test_service.py).
"""

from __future__ import annotations

import copy
import typing as t

from nad_guard.models import InputSpec
from service.loader import Settings

ERROR_LIST = {  # every error answer of the service: one object in a list (BentoML's shape for 4xx)
    "type": "array", "minItems": 1, "maxItems": 1,
    "items": {"type": "object", "required": ["error"], "additionalProperties": False,
              "properties": {"error": {"type": "string", "description": "What is wrong and what is expected."}}},
}
ERRORS = {
    400: "Bad input: the message says what is wrong and what is expected.",
    401: "No API key, or a wrong one (only when the server has one: NAD_GUARD_API_KEY).",
    405: "Another method than POST.",
    408: "The body did not arrive within NAD_GUARD_BODY_TIMEOUT_S; the connection is closed.",
    413: "The body is larger than the limit for its media type; the connection is closed.",
    415: "The body is none of JSON, .npy or a form.",
    500: "An unexpected error; the server log has the details.",
    503: "The server is overloaded (the request waited more than NAD_GUARD_MAX_LATENCY_MS for the model).",
    504: "The request was not answered within the server's request timeout.",
}
TEXT = {"text/plain": {"schema": {"type": "string"}}}


def batch_schema(spec: InputSpec, max_batch: int) -> dict[str, t.Any]:
    """JSON Schema of a batch ``(N, C, H, W)`` of numbers in ``[0, 1]``, ``1 <= N <= max_batch``."""
    def exactly(n: int, items: dict) -> dict:
        return {"type": "array", "minItems": n, "maxItems": n, "items": items}

    image = exactly(spec.channels, exactly(spec.height, exactly(spec.width, {
        "type": "number", "minimum": 0, "maximum": 1})))
    return {"type": "array", "minItems": 1, "maxItems": max_batch, "items": image,
            "description": f"A batch (N, {spec.channels}, {spec.height}, {spec.width}) of numbers in [0, 1], "
                           f"1 <= N <= {max_batch} (NAD_GUARD_MAX_BATCH)."}


BATCH_JSON = "nad-guard-batch-json"  # the string format of a form's `images` field: JSON text of a batch


def request_body(settings: Settings, spec: InputSpec) -> dict[str, t.Any]:
    """The prediction routes' request body: JSON, .npy, a multipart form with exactly one part, or a
    URL-encoded form with ``images`` (what the BentoML client sends). A form's ``images`` is one field
    holding the JSON text of the whole batch (OpenAPI 3.0 would read an array there as one part per
    image), so it is a string of the format ``nad-guard-batch-json``, described in words."""
    limits = settings.body_limits(spec)
    batch = batch_schema(spec, settings.max_batch)
    npy = {"type": "string", "format": "binary",
           "description": f"A .npy file (numpy.save, format 1.0 or 2.0) of an array shaped like `images`, float32 in "
                          f"[0, 1] or uint8 (divided by 255); at most {limits['images_npy']:,} bytes."}
    image = {"type": "string", "format": "binary",
             "description": f"A PNG or JPEG file of at most {settings.max_image_pixels:,} pixels "
                            f"(NAD_GUARD_MAX_IMAGE_PIXELS) and {limits['image']:,} bytes, converted to the model's "
                            f"input ({spec.channels} channel(s), {spec.height}x{spec.width}, /255)."}
    text = {"type": "string", "format": BATCH_JSON, "minLength": 2,
            "description": f"JSON text of `images` as in a JSON body: {batch['description']}"}
    return {"required": True, "description": (
        "Exactly one input, in one of these media types. The body's size limit depends on its media type: "
        + ", ".join(f"{m} {limits[m]:,} bytes" for m in ("application/json", "application/x-npy",
                                                           "multipart/form-data", "application/x-www-form-urlencoded"))
        + " (what the largest valid request needs; NAD_GUARD_MAX_REQUEST_BYTES caps them all)."),
        "content": {
            "application/json": {"schema": {"type": "object", "required": ["images"], "additionalProperties": False,
                                            "properties": {"images": batch}}},
            "application/x-npy": {"schema": npy},
            "multipart/form-data": {
                "schema": {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
                           "description": "Exactly one part: image, images_npy or images.",
                           "properties": {"image": image, "images_npy": npy, "images": text},
                           "oneOf": [{"required": [name]} for name in ("image", "images_npy", "images")]},
                "encoding": {"image": {"contentType": "image/png, image/jpeg"}}},
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "required": ["images"], "additionalProperties": False,
                           "properties": {"images": text}}},
        }}


def probes_parameter(settings: Settings, deep_probes: int) -> dict[str, t.Any]:
    """The ``probes`` query parameter of ``/predict_with_trust`` (deep mode, :mod:`nad_guard.deep`)."""
    allowed = [0] + ([deep_probes] if deep_probes else [])
    deep = (f" {deep_probes}: the deep check (one pass of each image and its {deep_probes} probes; the deep "
            f"detector's score decides; records add mode 'deep' and probes); a deep request holds at most "
            f"{settings.max_batch // (deep_probes + 1)} images (NAD_GUARD_MAX_BATCH // (K + 1))."
            if deep_probes else " This guard has no deep detector (nad-guard fit-detector --probes K fits one).")
    return {"name": "probes", "in": "query", "required": False, "schema": {"type": "integer", "enum": allowed},
            "description": "0 (the default): single pass." + deep + " Any other value is a 400."}


def document(base: dict[str, t.Any], settings: Settings, spec: InputSpec,
             predict_paths: t.Iterable[str], deep_probes: int = 0,
             deep_route: tuple[str, str] | None = None) -> dict[str, t.Any]:
    """BentoML's OpenAPI document ``base`` with the prediction routes, their errors, the
    infrastructure routes and the authentication described as :mod:`service.gate` serves them; with
    ``deep_route`` (public route, internal route), the public route's ``probes`` parameter, and the
    internal route left out (the gate does not serve it directly)."""
    doc = copy.deepcopy(base)
    if deep_route:
        doc["paths"].pop(deep_route[1], None)
    doc["info"] = {**doc.get("info", {}), "title": "nad-guard", "description": (
        "Image-classifier predictions with a calibrated trust score. Errors are answered "
        "`[{\"error\": \"...\"}]`. Limits: "
        f"{settings.max_batch} images a request, {settings.max_image_pixels:,} pixels an image file, the body "
        f"within {settings.body_timeout_s:g} s." + (" Every route but /healthz, /livez and /readyz"
                                                    + ("" if settings.metrics_auth else " and /metrics")
                                                    + " needs `Authorization: Bearer <key>`." if settings.api_key
                                                    else ""))}
    doc["info"].pop("contact", None)
    keyed = bool(settings.api_key)
    secured = [{"bearer": []}] if keyed else None
    if keyed:
        doc.setdefault("components", {})["securitySchemes"] = {"bearer": {
            "type": "http", "scheme": "bearer", "description": "The server's NAD_GUARD_API_KEY."}}
    body = request_body(settings, spec)
    for path in predict_paths:
        post = doc["paths"][path]["post"]
        post["responses"] = {str(k): v for k, v in post["responses"].items()}  # BentoML's keys are ints
        statuses = [400, 408, 413, 415, 500, 503, 504] + ([401] if keyed else [])
        post["responses"] = {"200": post["responses"]["200"], **{
            str(code): {"description": ERRORS[code], "content": {"application/json": {"schema": ERROR_LIST}}}
            for code in sorted(statuses)}}
        post["requestBody"] = body
        if deep_route and path == deep_route[0]:
            post["parameters"] = [probes_parameter(settings, deep_probes)]
        if secured:
            post["security"] = secured
    infra = {"/healthz": TEXT, "/livez": TEXT, "/metrics": TEXT,
             "/readyz": {**TEXT, "application/json": {"schema": {}}}}
    for path, content in infra.items():
        if path not in doc["paths"]:
            continue
        get = doc["paths"][path]["get"]
        get["responses"] = {str(k): v for k, v in get["responses"].items()}
        get["responses"]["200"] = {**get["responses"]["200"], "content": content}
        if path == "/readyz":
            get["responses"]["503"] = {"description": "Not ready yet.", "content": content}
        if keyed and path == "/metrics" and settings.metrics_auth:
            get["security"] = secured
            get["responses"]["401"] = {"description": ERRORS[401],
                                       "content": {"application/json": {"schema": ERROR_LIST}}}
    for name in ("GuardInput", "InvalidArgument", "NotFound", "InternalServerError"):
        doc.get("components", {}).get("schemas", {}).pop(name, None)  # replaced by the schemas above
    return doc
