"""Turn what a client sends into a batch the guard takes: float32 ``(N, C, H, W)`` in ``[0, 1]``.

Pure functions, no BentoML: the service calls them and maps :class:`InputError` to HTTP 400.

Two kinds of input:

* an image file (PNG or JPEG), converted to the model's input (:func:`decode_image`):

  1. the EXIF orientation is applied (photos from phones come upright);
  2. transparency is composited onto black (MNIST-style digits are light on dark);
  3. 16-bit grey is scaled to 8 bits; then ``L`` (ITU-R 601-2 luma) for 1-channel models, ``RGB``
     for 3-channel models (a grey image is repeated into the three channels);
  4. resized to the model's ``H x W`` with Pillow's bilinear filter (antialiased when shrinking),
     stretched: the aspect ratio is not kept, so crop or pad first if it matters;
  5. divided by 255. Nothing else: no inversion, no centring, no normalisation (the classifier
     normalises inside).

  Memory is bounded by the pixel limit, checked from the file's header before anything is decoded,
  and by decoding no more than the model needs: a JPEG more than ``REDUCING_GAP`` times the model's
  size is decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``: the decoder skips the detail); a PNG
  (no reduced decoding exists) is decoded whole and at once reduced by an integer factor (box
  average, Pillow's ``reduce``) to at least ``REDUCING_GAP`` times the model's size, before the
  conversions above make copies of it. Images within ``REDUCING_GAP`` times the model's size take
  the plain path (1-4 on the decoded pixels).

* an array (:func:`check_batch`): exactly ``(N, C, H, W)`` numbers in ``[0, 1]``, no resizing or
  reshaping; anything else is refused with a message saying what was expected. It comes as JSON
  (nested lists, :func:`read_json_object`) or as a ``.npy`` file (:func:`read_npy`: ``float32`` in
  ``[0, 1]``, or ``uint8`` divided by 255 like an image file's pixels; never unpickled).
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np
import pydantic_core
from PIL import Image, ImageFile, UnidentifiedImageError

from nad_guard.models import InputSpec
from service.loader import NPY_MAX_HEADER

IMAGE_FORMATS = ("PNG", "JPEG")
NPY_USAGE = ("a .npy file (numpy.save) of an array {shape}, float32 in [0, 1] or uint8 (0-255, divided by "
             "255 here)")
REDUCING_GAP = 3  # decode and reduce large images to at least this many times the model's size (Pillow's
# own default for thumbnails: the antialiased resize from there is indistinguishable from one from the full image)
FIELDS = ("image", "images", "images_npy")
USAGE = ("send exactly one of 'image' (a PNG or JPEG file in a multipart/form-data request, e.g. "
         "curl -F image=@digit.png), 'images' (a JSON array (N, C, H, W) of numbers in [0, 1], e.g. "
         "{\"images\": [...]} with Content-Type: application/json) or 'images_npy' (the same array as a .npy "
         "file, float32 in [0, 1] or uint8: the body with Content-Type: application/x-npy, or a file part "
         "-F images_npy=@batch.npy)")


class InputError(ValueError):
    """The client's input is wrong; the message says what is wrong and what is expected."""


def expected_shape(spec: InputSpec) -> str:
    return f"(N, {spec.channels}, {spec.height}, {spec.width})"


def check_batch(images: Any, spec: InputSpec, max_batch: int) -> np.ndarray:
    """``images`` (nested lists or an array) as float32 ``(N, C, H, W)`` in ``[0, 1]``; raises
    :class:`InputError` for anything else (wrong rank, channel count or size, empty or too large a
    batch, non-numbers, NaN/Inf, values outside ``[0, 1]``)."""
    want = expected_shape(spec)
    try:
        a = np.asarray(images)
    except ValueError as e:  # ragged nesting
        raise InputError(f"images is not a rectangular array ({e}); expected numbers shaped {want}") from e
    if a.dtype.kind not in "iuf":
        raise InputError(f"images holds {_kind(a)}, not numbers; expected numbers in [0, 1] shaped {want}")
    if a.ndim >= 1 and a.shape[0] == 0:
        raise InputError(f"images is an empty batch (shape {a.shape}); send at least one image shaped {want}")
    if a.ndim != 4:
        hint = " (one image: wrap it in a list)" if a.shape == spec.shape else ""
        raise InputError(f"images has shape {a.shape}; expected {want}{hint}")
    n, c, h, w = a.shape
    if n > max_batch:
        raise InputError(f"images holds {n} images, more than the limit of {max_batch} per request; "
                         "split the batch (the server's limit is NAD_GUARD_MAX_BATCH)")
    if c != spec.channels:
        raise InputError(f"images has {c} channel(s) (shape {a.shape}); this model takes {spec.channels} "
                         f"({_channels_name(spec.channels)}): expected {want}")
    if (h, w) != (spec.height, spec.width):
        raise InputError(f"images are {h}x{w} (shape {a.shape}); this model takes {spec.height}x{spec.width}: "
                         f"expected {want}; resize on the client, or upload an image file as 'image'")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise InputError(f"images contains NaN or infinite values (first at index {where}); "
                         "expected finite numbers in [0, 1]")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 1:
        raise InputError(f"images has values in [{lo:g}, {hi:g}], outside [0, 1]; expected numbers in [0, 1] "
                         "(divide 8-bit pixel values by 255)")
    return np.ascontiguousarray(a, dtype=np.float32)


def read_json_object(body: bytes) -> dict[str, Any]:
    """A JSON request body as its object of fields; raises :class:`InputError` for anything that is not
    valid UTF-8 JSON, not an object, or gives a key twice (JSON leaves duplicates undefined; parsers
    keep the last or the first, so a proxy and this server could read different inputs).

    Parsed by pydantic-core (several times faster than the json module). Duplicate keys are then ruled
    out by counting quotes: in an object whose only strings are its keys (a valid request: numbers,
    brackets and keys), there are two quote characters per key written, so a count of twice the
    parsed keys (and no backslash, which could spell a key another way) means no key was written
    twice. Bodies with other strings or escapes are checked key by key with the json module."""
    try:
        data = pydantic_core.from_json(body) if body.strip() else None
    except ValueError as e:
        raise InputError(f"the body is not valid JSON ({e}); {USAGE}") from None
    if not isinstance(data, dict):
        raise InputError(f"the JSON body must be an object like {{\"images\": [...]}}; {USAGE}")
    if body.count(b'"') != 2 * len(data) or b"\\" in body:
        json.loads(body, object_pairs_hook=_refuse_duplicate_keys)
    return data


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise InputError(f"the JSON object gives the key {key!r} more than once; send each field once")
        seen.add(key)
    return dict(pairs)


def read_json_text(text: bytes | str, field: str) -> Any:
    """A form field's JSON text (the BentoML client sends ``images`` so), parsed."""
    try:
        return pydantic_core.from_json(text)
    except ValueError as e:
        raise InputError(f"{field!r} must be JSON text of an (N, C, H, W) array ({e}); send a .npy file as "
                         "'images_npy', or an image file as 'image'") from None


def read_npy(data: bytes, spec: InputSpec, max_batch: int) -> np.ndarray:
    """A ``.npy`` file's bytes (:func:`numpy.save`) as float32 ``(N, C, H, W)`` in ``[0, 1]``: ``float32``
    (either byte order) is taken as it is, ``uint8`` is divided by 255 (as :func:`decode_image` does).

    Only the header is parsed (:mod:`numpy.lib.format`, versions 1.0 and 2.0, at most
    ``NPY_MAX_HEADER`` header bytes); object and structured dtypes are refused before any data is
    read, so nothing is ever unpickled, and the data must be exactly as long as the header says (no truncated or trailing
    bytes). The array is then checked like a JSON one (:func:`check_batch`). Raises
    :class:`InputError` with what is wrong and what is expected."""
    usage = "expected " + NPY_USAGE.format(shape=expected_shape(spec))
    if not data:
        raise InputError(f"the .npy data is empty; {usage}")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
    except ValueError:
        raise InputError(f"the data is not a .npy file (it starts with {data[:8]!r}, not b'\\x93NUMPY'); "
                         f"{usage}") from None
    if version not in ((1, 0), (2, 0)):
        raise InputError(f"unsupported .npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read: "
                         f"what numpy.save writes for plain arrays); {usage}")
    length_bytes = data[8:10] if version == (1, 0) else data[8:12]
    declared = int.from_bytes(length_bytes, "little")
    if len(length_bytes) == (2 if version == (1, 0) else 4) and declared > NPY_MAX_HEADER:
        raise InputError(f"the .npy header says it is {declared:,} bytes long; at most {NPY_MAX_HEADER:,} are read "
                         f"(numpy.save writes about 128 for a plain array); {usage}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = read_header(fp, max_header_size=NPY_MAX_HEADER)
    except (ValueError, SyntaxError, TypeError, EOFError) as e:  # malformed or truncated header
        raise InputError(f"the .npy header is malformed or truncated ({e}); {usage}") from None
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise InputError(f"the .npy array has dtype {dtype} (Python objects or records), which is refused "
                         f"(never unpickled); {usage}")
    if (dtype.kind, dtype.itemsize) not in (("f", 4), ("u", 1)):
        raise InputError(f"the .npy array has dtype {dtype}; {usage} (convert with x.astype(numpy.float32))")
    count = int(np.prod(shape, dtype=object)) if shape else 1
    offset, have = fp.tell(), len(data) - fp.tell()
    if have != count * dtype.itemsize:
        what = "truncated" if have < count * dtype.itemsize else "followed by extra bytes"
        raise InputError(f"the .npy data is {what}: its header says shape {shape} of {dtype} "
                         f"({count * dtype.itemsize:,} bytes), the file has {have:,} bytes after the header; {usage}")
    a = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran_order else "C")
    if dtype.kind == "u":
        a = a.astype(np.float32) / 255.0  # as decode_image does: float32 / 255
    return check_batch(a, spec, max_batch)


def decode_image(data: bytes, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """A PNG or JPEG file's bytes as float32 ``(1, C, H, W)`` in ``[0, 1]`` for ``spec`` (see the
    module docstring for the conversion and the memory bound). Raises :class:`InputError` for an
    empty, non-image, truncated or corrupt file, or one with more than ``max_pixels`` pixels (checked
    from the header, before decoding: decompression bombs are never decoded)."""
    if spec.channels not in (1, 3):
        raise InputError(f"image files can be converted for 1- or 3-channel models; this model takes "
                         f"{spec.channels} channels: send an array 'images' (JSON) or 'images_npy' (.npy) "
                         f"shaped {expected_shape(spec)}")
    if not data:
        raise InputError("the image file is empty; expected a PNG or JPEG file")
    too_many = ("the image is {size}, more than the limit of {limit:,} pixels (NAD_GUARD_MAX_IMAGE_PIXELS); "
                "shrink it before uploading (the model takes {w}x{h})")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        w, h = img.size
        if w * h > max_pixels:
            raise InputError(too_many.format(size=f"{w}x{h} = {w * h:,} pixels", limit=max_pixels, w=spec.width,
                                             h=spec.height))
        if w == 0 or h == 0:
            raise InputError(f"the image is {w}x{h} pixels; expected a non-empty PNG or JPEG image")
        orientation = img.getexif().get(ORIENTATION, 1)
        need = REDUCING_GAP * max(spec.width, spec.height)  # either side may become the width (EXIF rotation)
        if img.format == "JPEG":
            img.draft(img.mode, (need, need))  # decode at 1/2, 1/4 or 1/8 scale, still at least `need` a side
        img.load()  # decodes the pixels
        img = _reduce(img, min(img.size) // need)
        if method := EXIF_TRANSPOSE.get(orientation):  # photos from phones come upright
            img = img.transpose(method)
    except InputError:
        raise
    except UnidentifiedImageError as e:
        raise InputError(f"the file is not a PNG or JPEG image (it starts with {data[:8]!r}); "
                         "expected a PNG or JPEG file") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS) fired before the header check above: quote ours
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too large"
        raise InputError(too_many.format(size=size, limit=max_pixels, w=spec.width, h=spec.height)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        raise InputError(f"the image cannot be decoded ({e}); the file may be truncated or corrupt: "
                         "expected a complete PNG or JPEG file") from e
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone switched Pillow to accept truncated files
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; the service refuses to run with it")
    return _to_array(img, spec)


ORIENTATION = 0x0112  # the EXIF tag
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,  # as ImageOps.exif_transpose
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                  7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
REDUCIBLE = {"1": "L", "I;16": "I", "I;16L": "I", "I;16B": "I", "I;16N": "I", "PA": "RGBA"}  # modes reduce() lacks


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """``img`` box-averaged by ``factor`` in each direction (nothing if under 2), in a mode that keeps its
    meaning: palette images become RGB(A) and 16-bit grey becomes 32-bit ``I``, as :func:`_to_array`
    would convert them anyway. Alpha is premultiplied while averaging (Pillow's ``reduce``), so
    compositing onto black afterwards gives what compositing first and averaging would."""
    if factor < 2:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in REDUCIBLE:
        img = img.convert(REDUCIBLE[img.mode])
    return img.reduce(factor)


def _to_array(img: Image.Image, spec: InputSpec) -> np.ndarray:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grey PNG
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).clip(0, 255).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    img = img.convert("L" if spec.channels == 1 else "RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
    return np.ascontiguousarray(a)


def _kind(a: np.ndarray) -> str:
    names = {"b": "booleans", "U": "strings", "S": "bytes", "O": "mixed or nested values"}
    return names.get(a.dtype.kind, str(a.dtype))


def _channels_name(c: int) -> str:
    return {1: "grey", 3: "RGB"}.get(c, f"{c}-channel")
