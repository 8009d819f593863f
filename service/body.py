"""The body of POST /detect: parsed, limited and decoded.

``parse_detect_body(request, settings, spec)`` reads the body (at most
``max_upload_bytes``, whether or not Content-Length says so) and parses it,
by its Content-Type, as

* multipart/form-data: files in the field ``files``, optional text fields
  ``resize``, ``resize_mode`` and ``include_path``;
* JSON (``DetectRequest``): base64 images and the same flags;
* application/octet-stream: either the bytes of **one image file** (PNG,
  JPEG, GIF, BMP, WebP; sniffed from the bytes), or a NumPy **.npy array**
  (recognised by its magic string) of shape (N, H, W) (1-channel models) or
  (N, C, H, W), dtype uint8 (0-255) or float32 (in [0, 1]), C-ordered or
  Fortran-ordered, of the model's input size.  Its flags come from the query.
  The .npy header is read with NumPy's header parser (a literal, never
  evaluated code) and the data with ``np.frombuffer``: pickled (object)
  arrays are refused, never loaded.

at most ``max_images`` images; it returns a ``DetectBody``.  ``decode_body``
turns its uploads into the model's input (``images.decode_image``; small
images are decoded on the event loop, where a thread hop would cost more
than the decoding, larger ones on a worker thread); an .npy body is already
pixels.  Every failure is a ``ClientError`` (400, 413, 415 or 422) that says
what is wrong; no client input causes a 500.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib import format as npy_format
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from . import images as _images
from .errors import ClientError, summarise_validation
from .images import DecodedImage, ImageError, ImageSpec, decode_image
from .schemas import DetectRequest
from .settings import Settings

try:  # orjson parses JSON several times faster; json is the fallback (and gives the error messages)
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None

log = logging.getLogger("pathguard.service")

SUPPORTED_TYPES = ("multipart/form-data (field 'files'), application/json ({\"images\": [{\"data\": <base64>}]}) "
                   "or application/octet-stream (one image file, or an .npy array (N, H, W) / (N, C, H, W) of "
                   "uint8 or float32 in [0, 1])")
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}
RESIZE_MODES = getattr(_images, "RESIZE_MODES", ())
NPY_MAGIC = b"\x93NUMPY"
NPY_DTYPES = {np.dtype("uint8"): "uint8", np.dtype("<f4"): "float32"}
# Decoded on the event loop when every image's header declares its size and
# all of them together have at most this many pixels (e.g. 64 images of
# 28x28); anything larger, or of a format whose size is not read from the
# header, is decoded on a worker thread.
INLINE_DECODE_PIXELS = 64 * 28 * 28
INLINE_DECODE_BYTES = 512 * 1024


@dataclass
class Upload:
    """One image of a request: its bytes (multipart, octet-stream) or its base64 text (JSON)."""

    index: int
    filename: str | None
    data: bytes | None = None
    base64: str | None = None


@dataclass
class DetectBody:
    """What a /detect body asks for.  ``pixels`` is set for an .npy body:
    (N, C, H, W) float32 in [0, 1], already checked; ``uploads`` then only
    name the images (index, no filename)."""

    uploads: list[Upload]
    resize: bool = False
    resize_mode: str | None = None
    include_path: bool = False
    pixels: torch.Tensor | None = None


@dataclass
class DecodedBody:
    """The model's input of a request: (N, C, H, W) float32 and, per image,
    whether it was resized."""

    images: torch.Tensor
    resized: list[bool]


# ------------------------------------------------------------------ reading

async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ClientError(400, f"invalid Content-Length header {length[:40]!r}") from None
        if declared > limit:
            raise ClientError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise ClientError(413, f"request body is over the limit of {limit} bytes")
            if chunk:
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientError(400, "the client disconnected before sending the whole body") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def parse_detect_body(request: Request, settings: Settings, spec: ImageSpec) -> DetectBody:
    """The images and flags of a /detect body; anything unforeseen in the
    parsers is a 400 too, never a 500.  ``spec`` is the model's input (an
    .npy body is checked against it)."""
    try:
        return await _parse_detect_body(request, settings, spec)
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - no client input may cause a 500
        log.warning("unparseable /detect body (%s: %s)", type(exc).__name__, exc)
        raise ClientError(400, f"could not parse the request body ({type(exc).__name__})") from None


async def _parse_detect_body(request: Request, settings: Settings, spec: ImageSpec) -> DetectBody:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    is_multipart = media == "multipart/form-data"
    is_octet = media == "application/octet-stream"
    if media and not (is_json or is_multipart or is_octet):
        raise ClientError(415, f"unsupported Content-Type {media[:80]!r}: send {SUPPORTED_TYPES}")
    body = await read_body(request, settings.max_upload_bytes)
    if not body:
        raise ClientError(400, f"empty request body: send {SUPPORTED_TYPES}")
    if not media:
        raise ClientError(415, f"missing Content-Type header: send {SUPPORTED_TYPES}")
    if is_multipart:
        return await _parse_multipart(request, body, settings)
    if is_octet:
        return _parse_octet(body, settings, spec)
    return _parse_json(body, settings)


def _too_many(n: int | None, max_images: int) -> ClientError:
    count = f"{n} images" if n is not None else "too many images"
    return ClientError(413, f"{count} in one request; at most {max_images} are allowed")


def _clean_filename(name: str | None) -> str | None:
    if not name:
        return None
    return name.replace("\x00", "")[:255] or None


# ---------------------------------------------------------------- multipart

def _parse_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ClientError(422, f"form field {name!r} must be true or false, got {value[:40]!r}")


def _parse_mode(name: str, value: str) -> str:
    word = value.strip().lower()
    if word in RESIZE_MODES:
        return word
    raise ClientError(422, f"form field {name!r} must be one of {', '.join(RESIZE_MODES)}, got {value[:40]!r}")


async def _read_form(request: Request, body: bytes, settings: Settings) -> FormData:
    async def replay():
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=settings.max_images, max_fields=16,
                             max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many(None, settings.max_images) from None
        raise ClientError(400, f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types
        raise ClientError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None


async def _form_items(form: FormData) -> tuple[list[Upload], dict, list[str]]:
    """The uploads, the flags and every field name, in order; refuses
    unknown fields and a file or a text where the other belongs."""
    uploads: list[Upload] = []
    flags: dict = {"resize": False, "include_path": False}
    text_fields = ["resize", "include_path"] + (["resize_mode"] if RESIZE_MODES else [])
    names = []
    for name, value in form.multi_items():
        names.append(name)
        if name == "files":
            if not isinstance(value, UploadFile):
                raise ClientError(422, "form field 'files' must be a file upload, not a text value")
            uploads.append(Upload(len(uploads), _clean_filename(value.filename), await value.read()))
        elif name in text_fields:
            if isinstance(value, UploadFile):
                kind = "one of " + ", ".join(RESIZE_MODES) if name == "resize_mode" else "true/false"
                raise ClientError(422, f"form field {name!r} must be a text value ({kind}), not a file")
            flags[name] = _parse_mode(name, value) if name == "resize_mode" else _parse_bool(name, value)
        else:
            optional = ", ".join(repr(f) for f in text_fields)
            raise ClientError(422, f"unknown form field {name[:60]!r}: send images in the field 'files' "
                                   f"(optional fields: {optional})")
    return uploads, flags, names


async def _parse_multipart(request: Request, body: bytes, settings: Settings) -> DetectBody:
    form = await _read_form(request, body, settings)
    try:
        uploads, flags, names = await _form_items(form)
    finally:
        await form.close()
    if not uploads:
        found = f" (found: {', '.join(repr(n[:60]) for n in dict.fromkeys(names))})" if names else ""
        raise ClientError(422, f"no images: the multipart body has no 'files' field{found}")
    if len(uploads) > settings.max_images:
        raise _too_many(len(uploads), settings.max_images)
    return DetectBody(uploads, flags["resize"], flags.get("resize_mode"), flags["include_path"])


# --------------------------------------------------------------------- JSON

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _loads(body: bytes):
    """The JSON value of ``body``: orjson when it can; what it refuses goes
    through json, which accepts what it accepted before (and words the
    errors: NaN, nesting, encoding)."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ClientError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ClientError(400, f"malformed JSON body: {exc}") from None


def _parse_json(body: bytes, settings: Settings) -> DetectBody:
    payload = _loads(body)
    if isinstance(payload, dict) and isinstance(payload.get("images"), list) \
            and len(payload["images"]) > settings.max_images:
        raise _too_many(len(payload["images"]), settings.max_images)
    try:
        request = DetectRequest.model_validate(payload)
    except ValidationError as exc:
        detail, items = summarise_validation(exc.errors(include_url=False, include_input=False),
                                             "invalid JSON body: ")
        raise ClientError(422, detail, errors=items) from None
    uploads = [Upload(i, _clean_filename(img.filename), base64=img.data) for i, img in enumerate(request.images)]
    mode = getattr(request, "resize_mode", None)
    return DetectBody(uploads, request.resize, mode, request.include_path)


# ------------------------------------------------------------ octet-stream

def _parse_octet(body: bytes, settings: Settings, spec: ImageSpec) -> DetectBody:
    """One image file, or an .npy array of images."""
    if not body.startswith(NPY_MAGIC):
        return DetectBody([Upload(0, None, data=body)])
    pixels = parse_npy(body, spec, settings.max_images)
    return DetectBody([Upload(i, None) for i in range(len(pixels))], pixels=pixels)


def _npy_header(body: bytes) -> tuple[tuple, bool, np.dtype, int]:
    """Shape, Fortran order, dtype and data offset of an .npy file, or a 400."""
    stream = io.BytesIO(body)
    try:
        version = npy_format.read_magic(stream)
    except ValueError as exc:
        raise ClientError(400, f"malformed .npy body: {exc}") from None
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    if version not in readers:
        raise ClientError(400, f"malformed .npy body: format version {version[0]}.{version[1]} is not "
                               "supported (send version 1.0 or 2.0, as numpy.save writes)")
    try:
        shape, fortran_order, dtype = readers[version](stream, max_header_size=4096)
    except Exception as exc:  # noqa: BLE001 - ValueError, SyntaxError, ... : a bad header
        raise ClientError(400, f"malformed .npy body: {exc}") from None
    return shape, fortran_order, dtype, stream.tell()


def parse_npy(body: bytes, spec: ImageSpec, max_images: int) -> torch.Tensor:
    """An .npy body as (N, C, H, W) float32 in [0, 1], checked: 400 for a
    malformed or truncated file, 413 for too many images, 422 for a dtype,
    shape or value the model cannot take."""
    shape, fortran_order, dtype, offset = _npy_header(body)
    if dtype.hasobject:
        raise ClientError(422, "the .npy array holds Python objects (a pickle): refused; send uint8 or "
                               "float32 pixels")
    if dtype not in NPY_DTYPES:
        raise ClientError(422, f"the .npy array has dtype {dtype.str!r} ({dtype}); send uint8 (0-255) or "
                               "little-endian float32 ('<f4', values in [0, 1])")
    channels, height, width = spec.shape
    expected = f"(N, {channels}, {height}, {width})"
    if channels == 1:
        expected = f"(N, {height}, {width}) or {expected}"
    if len(shape) == 3 and channels == 1:
        image_shape = (1, *shape[1:])
    elif len(shape) == 4:
        image_shape = tuple(shape[1:])
    else:
        raise ClientError(422, f"the .npy array has shape {shape}; the model takes {expected}")
    n = shape[0]
    if n > max_images:
        raise _too_many(n, max_images)
    if n == 0:
        raise ClientError(422, f"no images: the .npy array has shape {shape}")
    if image_shape != spec.shape:
        raise ClientError(422, f"the .npy array has shape {shape}; the model takes {expected} (arrays are "
                               f"not resized: resize applies to image files)")
    count = int(np.prod(shape))
    needed = count * dtype.itemsize
    data = memoryview(body)[offset:]
    if len(data) < needed:
        raise ClientError(400, f"truncated .npy body: shape {shape} of {NPY_DTYPES[dtype]} needs {needed} "
                               f"bytes of data, got {len(data)}")
    if len(data) > needed:
        raise ClientError(400, f"malformed .npy body: {len(data) - needed} bytes after the array's data")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran_order else "C")
    if dtype == np.uint8:
        pixels = array.astype(np.float32) / 255.0  # as images.decode_image scales 8-bit pixels
    else:
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise ClientError(422, f"the .npy array has {bad} non-finite values (NaN or infinity); pixels must "
                                   "be in [0, 1]")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ClientError(422, f"float32 pixels must be in [0, 1]; the .npy array has values from {low:g} "
                                   f"to {high:g} (send uint8 for 0-255)")
        pixels = array
    # A copy: the body's bytes are read-only, and a tensor must own writable memory.
    return torch.from_numpy(np.array(pixels, dtype=np.float32, order="C").reshape((n, *spec.shape)))


# ----------------------------------------------------------------- decoding

def _decode_base64(text: str, index: int, filename: str | None) -> bytes:
    payload = text
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ImageError(index, filename, "a data: URL must be of the form 'data:<type>;base64,<data>'")
    payload = "".join(payload.split())
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(index, filename, f"malformed base64 data ({exc})") from None
    if not data:
        raise ImageError(index, filename, "empty file (base64 data decodes to 0 bytes)")
    return data


def _file_bytes(uploads: list[Upload]) -> tuple[list[bytes], ImageError | None]:
    """Each upload's file bytes (base64 decoded), up to the first whose
    base64 is unusable, and that one's error."""
    files = []
    for up in uploads:
        if up.data is not None:
            files.append(up.data)
            continue
        try:
            files.append(_decode_base64(up.base64 or "", up.index, up.filename))
        except ImageError as exc:
            return files, exc
    return files, None


def _small(files: list[bytes]) -> bool:
    """Cheap enough to decode on the event loop: every header declares its
    size, and all together are small."""
    if sum(len(f) for f in files) > INLINE_DECODE_BYTES:
        return False
    pixels = 0
    for data in files:
        size = _images.declared_size(data, _images.sniff_format(data))
        if size is None:
            return False
        pixels += max(size[0], 0) * max(size[1], 0)
        if pixels > INLINE_DECODE_PIXELS:
            return False
    return True


def _decode_all(uploads: list[Upload], files: list[bytes], spec: ImageSpec, resize) -> list[DecodedImage]:
    return [decode_image(data, spec, index=up.index, filename=up.filename, resize=resize)
            for up, data in zip(uploads, files)]


def _stack(decoded: list[DecodedImage]) -> DecodedBody:
    return DecodedBody(torch.stack([d.tensor for d in decoded]), [d.resized for d in decoded])


async def decode_body(body: DetectBody, spec: ImageSpec, resize) -> DecodedBody:
    """The model's input of a request; the first unusable image refuses the
    request, naming it (``index``, ``filename``).  ``resize`` is what
    ``images.decode_image`` takes."""
    if body.pixels is not None:
        return DecodedBody(body.pixels, [False] * len(body.pixels))
    try:
        files, error = _file_bytes(body.uploads)
        if _small(files):
            decoded = _decode_all(body.uploads, files, spec, resize)
        else:
            decoded = await run_in_threadpool(_decode_all, body.uploads, files, spec, resize)
        if error is not None:  # the images before it were fine: it is the first unusable one
            raise error
        return _stack(decoded)
    except ImageError as exc:
        raise ClientError(exc.status, str(exc), index=exc.index, filename=exc.filename) from None
