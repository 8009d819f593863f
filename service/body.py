"""The body of POST /detect: parsed, limited and decoded.

``parse_detect_body(request, settings)`` reads the body (at most
``max_upload_bytes``, whether or not Content-Length says so) and parses it as
multipart/form-data (files in the field ``files``, optional text fields
``resize`` and ``include_path``) or JSON (``DetectRequest``: base64 images),
at most ``max_images`` images; it returns the uploads, in request order, and
the two flags.  ``decode_uploads`` turns the uploads into model-sized tensors
(``images.decode_image``).  Every failure is a ``ClientError`` (400, 413,
415 or 422) that says what is wrong; no client input causes a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .errors import ClientError, summarise_validation
from .images import DecodedImage, ImageError, ImageSpec, decode_image
from .schemas import DetectRequest
from .settings import Settings

log = logging.getLogger("pathguard.service")

SUPPORTED_TYPES = "multipart/form-data (field 'files') or application/json ({\"images\": [{\"data\": <base64>}]})"
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


@dataclass
class Upload:
    """One image of a request: its bytes (multipart) or its base64 text (JSON)."""

    index: int
    filename: str | None
    data: bytes | None = None
    base64: str | None = None


Parsed = tuple[list[Upload], bool, bool]  # uploads, resize, include_path


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
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientError(400, "the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def parse_detect_body(request: Request, settings: Settings) -> Parsed:
    """The uploads and flags of a /detect body; anything unforeseen in the
    parsers is a 400 too, never a 500."""
    try:
        return await _parse_detect_body(request, settings)
    except ClientError:
        raise
    except Exception as exc:  # noqa: BLE001 - no client input may cause a 500
        log.warning("unparseable /detect body (%s: %s)", type(exc).__name__, exc)
        raise ClientError(400, f"could not parse the request body ({type(exc).__name__})") from None


async def _parse_detect_body(request: Request, settings: Settings) -> Parsed:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (media.startswith("application/") and media.endswith("+json"))
    is_multipart = media == "multipart/form-data"
    if media and not (is_json or is_multipart):
        raise ClientError(415, f"unsupported Content-Type {media[:80]!r}: send {SUPPORTED_TYPES}")
    body = await read_body(request, settings.max_upload_bytes)
    if not body:
        raise ClientError(400, f"empty request body: send {SUPPORTED_TYPES}")
    if not media:
        raise ClientError(415, f"missing Content-Type header: send {SUPPORTED_TYPES}")
    if is_multipart:
        return await _parse_multipart(request, body, settings)
    return _parse_json(body, settings)


def _too_many(n: int | None, settings: Settings) -> ClientError:
    count = f"{n} images" if n is not None else "too many images"
    return ClientError(413, f"{count} in one request; at most {settings.max_images} are allowed")


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


async def _read_form(request: Request, body: bytes, settings: Settings) -> FormData:
    async def replay():
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=settings.max_images, max_fields=16,
                             max_part_size=64 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise _too_many(None, settings) from None
        raise ClientError(400, f"malformed multipart body: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several types
        raise ClientError(400, f"malformed multipart body ({type(exc).__name__}: {exc})") from None


async def _form_items(form: FormData) -> tuple[list[Upload], dict[str, bool], list[str]]:
    """The uploads, the flags and every field name, in order; refuses
    unknown fields and a file or a text where the other belongs."""
    uploads: list[Upload] = []
    flags = {"resize": False, "include_path": False}
    names = []
    for name, value in form.multi_items():
        names.append(name)
        if name == "files":
            if not isinstance(value, UploadFile):
                raise ClientError(422, "form field 'files' must be a file upload, not a text value")
            uploads.append(Upload(len(uploads), _clean_filename(value.filename), await value.read()))
        elif name in flags:
            if isinstance(value, UploadFile):
                raise ClientError(422, f"form field {name!r} must be a text value (true/false), not a file")
            flags[name] = _parse_bool(name, value)
        else:
            raise ClientError(422, f"unknown form field {name[:60]!r}: send images in the field 'files' "
                                   f"(optional fields: 'resize', 'include_path')")
    return uploads, flags, names


async def _parse_multipart(request: Request, body: bytes, settings: Settings) -> Parsed:
    form = await _read_form(request, body, settings)
    try:
        uploads, flags, names = await _form_items(form)
    finally:
        await form.close()
    if not uploads:
        found = f" (found: {', '.join(repr(n[:60]) for n in dict.fromkeys(names))})" if names else ""
        raise ClientError(422, f"no images: the multipart body has no 'files' field{found}")
    if len(uploads) > settings.max_images:
        raise _too_many(len(uploads), settings)
    return uploads, flags["resize"], flags["include_path"]


# --------------------------------------------------------------------- JSON

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(body: bytes, settings: Settings) -> Parsed:
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ClientError(400, "malformed JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ClientError(400, f"malformed JSON body: {exc}") from None
    if isinstance(payload, dict) and isinstance(payload.get("images"), list) \
            and len(payload["images"]) > settings.max_images:
        raise _too_many(len(payload["images"]), settings)
    try:
        request = DetectRequest.model_validate(payload)
    except ValidationError as exc:
        detail, items = summarise_validation(exc.errors(include_url=False, include_input=False),
                                             "invalid JSON body: ")
        raise ClientError(422, detail, errors=items) from None
    uploads = [Upload(i, _clean_filename(img.filename), base64=img.data) for i, img in enumerate(request.images)]
    return uploads, request.resize, request.include_path


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


def _decode_all(uploads: list[Upload], spec: ImageSpec, resize: bool) -> list[DecodedImage]:
    out = []
    for up in uploads:
        data = up.data if up.data is not None else _decode_base64(up.base64 or "", up.index, up.filename)
        out.append(decode_image(data, spec, index=up.index, filename=up.filename, resize=resize))
    return out


async def decode_uploads(uploads: list[Upload], spec: ImageSpec, resize: bool) -> list[DecodedImage]:
    """Every upload decoded (off the event loop); the first unusable one
    refuses the request, naming it (``index``, ``filename``)."""
    try:
        return await run_in_threadpool(_decode_all, uploads, spec, resize)
    except ImageError as exc:
        raise ClientError(exc.status, str(exc), index=exc.index, filename=exc.filename) from None
