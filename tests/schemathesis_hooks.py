"""Schemathesis hooks for the service's OpenAPI document (loaded with SCHEMATHESIS_HOOKS).

The document describes bodies that JSON Schema cannot spell out: a .npy file, a PNG or JPEG file,
and the JSON text of a batch in a form field (:mod:`service.openapi`). These strategies generate
valid ones, of the model and limits given by the environment (``NAD_GUARD_TEST_SPEC``:
``channels,height,width,max_batch``), so that Schemathesis can check that every request the document
calls valid is accepted; it still generates invalid ones of its own for the other checks.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

C, H, W, MAX_BATCH = (int(v) for v in os.environ.get("NAD_GUARD_TEST_SPEC", "1,28,28,64").split(","))


@st.composite
def _batch(draw, max_n: int = 4) -> np.ndarray:
    n = draw(st.integers(1, min(max_n, MAX_BATCH)))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random((n, C, H, W)).astype(np.float32)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@st.composite
def _image(draw, fmt: str) -> bytes:
    side = draw(st.integers(1, 3 * max(H, W)))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"] if fmt == "PNG" else ["L", "RGB"]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(buf, fmt)
    return buf.getvalue()


npy_files = _batch().map(_npy) | _batch().map(lambda a: _npy((a * 255).astype(np.uint8)))
schemathesis.openapi.media_type("application/x-npy", npy_files)
schemathesis.openapi.format("binary", npy_files)
schemathesis.openapi.media_type("image/png", _image("PNG"))
schemathesis.openapi.media_type("image/jpeg", _image("JPEG"))
schemathesis.openapi.format("nad-guard-batch-json", _batch().map(lambda a: json.dumps(a.tolist())))
