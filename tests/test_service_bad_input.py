"""A corpus of bad (and awkward-but-valid) input against a live server.

Every case asserts the status, that the JSON ``detail`` says what is wrong,
and that the server is still healthy afterwards.  No case may get a 5xx.

Decisions recorded here (and in service/images.py):
  * refused (4xx): empty body, no 'files' field, non-image bytes (whatever the
    declared content type), truncated PNG/JPEG, zero-size image, a header
    claiming more than max_pixels (decompression bomb), body over
    max_upload_bytes (413), more than max_images images (413), animated
    GIF/PNG, TIFF, wrong size without resize, malformed base64, JSON with
    wrong types / missing / unknown fields (422), NaN or Infinity (not JSON:
    400), wrong method (405), unsupported Content-Type (415);
  * accepted (200) after conversion when the size is right: CMYK JPEG,
    16-bit PNG (kept at 16-bit precision), PNG with alpha (composited on
    black), palette PNG, grey+alpha, bilevel, RGB (to luma), BMP, WebP,
    single-frame GIF, JPEG, base64 with a data: URL prefix.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Callable

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service_fixtures import (
    LiveServer, encode, fmnist_images, offline_inspector, png_of, png_with_header, to_uint8,
)

torch.set_num_threads(1)

MAX_IMAGES = 8
MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="session")
def bundle(service_bundle):
    return service_bundle


@pytest.fixture(scope="module")
def server(bundle):
    from pathguard.service.settings import Settings

    settings = Settings(bundle=bundle, max_images=MAX_IMAGES, max_upload_bytes=MAX_UPLOAD, torch_threads=1)
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


# ------------------------------------------------------------ builders

def grey() -> np.ndarray:
    """A real Fashion-MNIST test image as uint8 (28, 28)."""
    return to_uint8(fmnist_images(1)[0])


def good_png() -> bytes:
    return png_of(fmnist_images(1)[0])


def files(*parts) -> dict:
    return {"files": [("files", part) for part in parts]}


def one_file(data: bytes, name: str = "x.png", ctype: str = "image/png") -> dict:
    return files((name, data, ctype))


def raw_multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "pgboundary") -> dict:
    """A hand-built multipart body: (field name, filename or None for text, content)."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def as_json(payload, raw: bool = False) -> dict:
    content = payload if raw else json.dumps(payload).encode()
    return {"content": content, "headers": {"Content-Type": "application/json"}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def truncated(fmt: str) -> bytes:
    data = encode(grey(), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return data[: len(data) // 2]


def animated(fmt: str) -> bytes:
    a = grey()
    return encode(Image.fromarray(a), fmt, save_all=True, append_images=[Image.fromarray(255 - a)])


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(grey()).convert("RGB").convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    return encode(Image.fromarray(grey().astype(np.uint16) * 257), "PNG")  # same levels, 16 bits


def png_alpha(transparent_left: bool) -> bytes:
    a = grey()
    alpha = np.full_like(a, 255)
    if transparent_left:
        alpha[:, :14] = 0
    return encode(Image.fromarray(np.dstack([a, a, a, alpha]), "RGBA"), "PNG")


def expected_alpha_pixels() -> np.ndarray:
    a = grey().copy()
    a[:, :14] = 0  # transparent pixels are composited onto black
    return a


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(encode(grey(), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(grey(), "GIF"))
    data[6:10] = width.to_bytes(2, "little") + height.to_bytes(2, "little")
    return bytes(data)


def exif_rotated_png() -> bytes:
    """The test image stored rotated 90 degrees counter-clockwise, with EXIF
    orientation 6 ("rotate 90 clockwise to display"): shown, it is the original."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(np.ascontiguousarray(np.rot90(grey()))), "PNG", exif=exif)


def chunked(data: bytes, size: int = 16 * 1024):
    def gen():
        for start in range(0, len(data), size):
            yield data[start:start + size]

    return {"content": gen(), "headers": {"Content-Type": "application/json"}}


def noise_png(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 256, size=(height, width), dtype=np.uint8), "PNG")


def octet(data: bytes) -> dict:
    return {"content": data, "headers": {"Content-Type": "application/octet-stream"}}


def npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def grey_stack(n: int = 2) -> np.ndarray:
    """n copies of the real test image as uint8 (n, 28, 28)."""
    return np.stack([grey()] * n)


def npy_with_header(header: bytes) -> bytes:
    """An .npy file (version 1.0) with this header text and a few data bytes."""
    header = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(16)


# --------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    build: Callable[[], dict]
    status: int
    needle: str = ""
    method: str = "POST"
    path: str = "/detect"
    same_as: Callable[[], np.ndarray] | None = None  # 200 cases: pixels it must score like
    check: Callable[[httpx.Response], None] | None = field(default=None)


def _allow_post(r: httpx.Response) -> None:
    assert r.headers["allow"] == "POST"


def _names_second_image(r: httpx.Response) -> None:
    assert r.json()["index"] == 1 and r.json()["filename"] == "bad.png"


def _resized(r: httpx.Response) -> None:
    assert r.json()["results"][0]["resized"] is True


def _filename_cut(r: httpx.Response) -> None:
    assert len(r.json()["results"][0]["filename"]) == 255


def _validation_errors(r: httpx.Response) -> None:
    assert r.json()["errors"] and all({"loc", "msg"} <= set(e) for e in r.json()["errors"])


CASES = [
    # --- body and framing
    Case("empty-body", lambda: {}, 400, "empty request body"),
    Case("empty-json-body", lambda: as_json(b"", raw=True), 400, "empty request body"),
    Case("missing-content-type", lambda: {"content": good_png()}, 415, "missing Content-Type"),
    Case("text-plain", lambda: {"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported Content-Type 'text/plain'"),
    Case("urlencoded-form", lambda: {"data": {"files": "abc"}}, 415,
         "unsupported Content-Type 'application/x-www-form-urlencoded'"),
    Case("raw-png-body", lambda: {"content": good_png(), "headers": {"Content-Type": "image/png"}}, 415,
         "multipart/form-data (field 'files')"),
    Case("multipart-without-boundary",
         lambda: {"content": b"--x\r\n\r\n", "headers": {"Content-Type": "multipart/form-data"}}, 400,
         "malformed multipart body"),
    Case("multipart-no-files-field", lambda: raw_multipart([("resize", None, b"true")]), 422,
         "no images: the multipart body has no 'files' field (found: 'resize')"),
    Case("multipart-empty", lambda: raw_multipart([]), 422, "no 'files' field"),
    Case("multipart-wrong-field-name", lambda: {"files": [("image", ("a.png", good_png(), "image/png"))]}, 422,
         "unknown form field 'image': send images in the field 'files'"),
    Case("files-field-is-text", lambda: raw_multipart([("files", None, b"not a file")]), 422,
         "'files' must be a file upload"),
    Case("form-resize-not-a-bool", lambda: raw_multipart([("files", "a.png", good_png()), ("resize", None, b"maybe")]),
         422, "form field 'resize' must be true or false, got 'maybe'"),
    Case("query-resize-not-a-bool", lambda: {**one_file(good_png()), "params": {"resize": "maybe"}}, 422,
         "query.resize"),
    # --- limits
    Case("upload-over-limit", lambda: one_file(noise_png(600, 600), "big.png"), 413,
         f"over the limit of {MAX_UPLOAD} bytes"),
    Case("upload-over-limit-chunked", lambda: chunked(b'{"images": [' + b" " * (MAX_UPLOAD + 10) + b"]}"), 413,
         f"request body is over the limit of {MAX_UPLOAD} bytes"),
    Case("too-many-files", lambda: files(*[(f"{i}.png", good_png(), "image/png") for i in range(MAX_IMAGES + 1)]),
         413, f"at most {MAX_IMAGES} are allowed"),
    Case("far-too-many-files", lambda: files(*[(f"{i}.png", good_png(), "image/png") for i in range(40)]),
         413, f"at most {MAX_IMAGES} are allowed"),
    Case("json-too-many-images", lambda: as_json({"images": [{"data": b64(good_png())}] * (MAX_IMAGES + 1)}), 413,
         f"{MAX_IMAGES + 1} images in one request; at most {MAX_IMAGES}"),
    Case("json-huge-array", lambda: as_json({"images": [0] * 60000}), 413, "60000 images in one request"),
    # --- not images / broken images
    Case("text-with-image-content-type", lambda: one_file(b"this is plain text, not a picture", "x.png"), 422,
         "image 0 ('x.png'): not a recognised image"),
    Case("random-bytes-as-jpeg", lambda: one_file(np.random.default_rng(1).bytes(2000), "x.jpg", "image/jpeg"),
         422, "not a recognised image"),
    Case("empty-file", lambda: one_file(b"", "empty.png"), 422, "image 0 ('empty.png'): empty file (0 bytes)"),
    Case("truncated-png", lambda: one_file(truncated("PNG")), 422, "truncated or corrupt PNG"),
    Case("truncated-jpeg", lambda: one_file(truncated("JPEG"), "x.jpg", "image/jpeg"), 422,
         "truncated or corrupt JPEG"),
    Case("png-cut-in-trailing-chunks", lambda: one_file(good_png()[:-16]), 422, "truncated or corrupt PNG"),
    Case("truncated-png-header", lambda: one_file(good_png()[:20]), 422, "truncated or corrupt PNG header"),
    Case("zero-size-png", lambda: one_file(png_with_header(0, 28)), 422, "zero-size image"),
    Case("bomb-100000x100000", lambda: one_file(png_with_header(100000, 100000), "bomb.png"), 422,
         "decompression bomb"),
    Case("bomb-just-over-limit", lambda: one_file(png_with_header(5000, 4000), "bomb.png"), 422,
         "5000x4000 = 20000000 pixels, over the limit of 16777216 pixels"),
    Case("bomb-jpeg-header", lambda: one_file(jpeg_claiming(60000, 60000), "bomb.jpg", "image/jpeg"), 422,
         "possible decompression bomb"),
    Case("bomb-gif-header", lambda: one_file(gif_claiming(65535, 65535), "bomb.gif", "image/gif"), 422,
         "65535x65535 = 4294836225 pixels, over the limit"),
    Case("animated-gif", lambda: one_file(animated("GIF"), "a.gif", "image/gif"), 422,
         "animated GIF with 2 frames"),
    Case("animated-png", lambda: one_file(animated("PNG")), 422, "animated PNG with 2 frames"),
    Case("tiff", lambda: one_file(encode(grey(), "TIFF"), "a.tiff", "image/tiff"), 422,
         "TIFF images are not supported"),
    Case("wrong-size", lambda: one_file(encode(np.zeros((32, 40), np.uint8), "PNG")), 422,
         "size 40x32 does not match the model's input 28x28"),
    Case("bad-image-among-good", lambda: files(("ok.png", good_png(), "image/png"), ("bad.png", b"nope", "image/png"),
                                               ("ok2.png", good_png(), "image/png")),
         422, "image 1 ('bad.png')", check=_names_second_image),
    # --- JSON
    Case("malformed-base64", lambda: as_json({"images": [{"data": "not*base64!"}]}), 422,
         "image 0: malformed base64"),
    Case("base64-bad-padding", lambda: as_json({"images": [{"data": b64(good_png())[:-3]}]}), 422,
         "malformed base64"),
    Case("base64-non-ascii", lambda: as_json({"images": [{"data": "ÿÿÿÿ"}]}), 422, "malformed base64"),
    Case("base64-of-text", lambda: as_json({"images": [{"data": b64(b"hello there")}]}), 422,
         "not a recognised image"),
    Case("bad-data-url", lambda: as_json({"images": [{"data": "data:image/png," + b64(good_png())}]}), 422,
         "data: URL must be of the form"),
    Case("json-malformed", lambda: as_json(b'{"images": [', raw=True), 400, "malformed JSON body"),
    Case("json-not-utf8", lambda: as_json(b'{"images": "\xff\xfe"}', raw=True), 400, "malformed JSON body"),
    Case("json-deeply-nested", lambda: as_json(b"[" * 100000 + b"]" * 100000, raw=True), 400,
         "malformed JSON body"),
    Case("json-nan", lambda: as_json(b'{"images": [{"data": NaN}]}', raw=True), 400, "NaN is not valid JSON"),
    Case("json-infinity", lambda: as_json(b'{"images": [{"data": "A"}], "resize": Infinity}', raw=True), 400,
         "Infinity is not valid JSON"),
    Case("json-top-level-array", lambda: as_json([{"data": "A"}]), 422, "valid dictionary"),
    Case("json-missing-images", lambda: as_json({}), 422, "images: Field required", check=_validation_errors),
    Case("json-missing-data", lambda: as_json({"images": [{"filename": "a.png"}]}), 422,
         "images.0.data: Field required"),
    Case("json-empty-images", lambda: as_json({"images": []}), 422, "images: List should have at least 1 item"),
    Case("json-images-not-a-list", lambda: as_json({"images": "abc"}), 422, "images: Input should be a valid list"),
    Case("json-data-not-a-string", lambda: as_json({"images": [{"data": 123}]}), 422,
         "images.0.data: Input should be a valid string"),
    Case("json-resize-as-string", lambda: as_json({"images": [{"data": b64(good_png())}], "resize": "yes"}), 422,
         "resize: Input should be a valid boolean"),
    Case("json-filename-too-long", lambda: as_json({"images": [{"data": b64(good_png()), "filename": "a" * 300}]}),
         422, "images.0.filename"),
    Case("json-unknown-field", lambda: as_json({"images": [{"data": b64(good_png())}], "threshold": 0}), 422,
         "threshold: Extra inputs are not permitted"),
    Case("json-unknown-image-field", lambda: as_json({"images": [{"data": b64(good_png()), "label": 3}]}), 422,
         "images.0.label: Extra inputs are not permitted"),
    # --- application/octet-stream: one image file, or an .npy array
    Case("octet-empty-body", lambda: octet(b""), 400, "empty request body"),
    Case("octet-not-an-image", lambda: octet(b"plain text, not a picture"), 422, "image 0: not a recognised image"),
    Case("octet-truncated-png", lambda: octet(truncated("PNG")), 422, "truncated or corrupt PNG"),
    Case("octet-wrong-size", lambda: octet(encode(np.zeros((32, 40), np.uint8), "PNG")), 422,
         "size 40x32 does not match the model's input 28x28"),
    Case("octet-resize-mode-unknown", lambda: {**octet(good_png()), "params": {"resize_mode": "squash"}}, 422,
         "query.resize_mode"),
    Case("npy-truncated", lambda: octet(npy(grey_stack(2))[:-100]), 400,
         "truncated .npy body: shape (2, 28, 28) of uint8 needs 1568 bytes of data, got 1468"),
    Case("npy-cut-in-header", lambda: octet(npy(grey_stack(2))[:40]), 400, "malformed .npy body"),
    Case("npy-trailing-bytes", lambda: octet(npy(grey_stack(2)) + b"extra"), 400, "5 bytes after the array's data"),
    Case("npy-garbage-header", lambda: octet(npy_with_header(b"{'descr': __import__('os')}")), 400,
         "malformed .npy body"),
    Case("npy-version-3", lambda: octet(b"\x93NUMPY\x03\x00" + npy(grey_stack(1))[8:]), 400,
         "format version 3.0 is not supported"),
    Case("npy-pickled-objects", lambda: octet(npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)),
         422, "holds Python objects (a pickle): refused"),
    Case("npy-wrong-dtype-float64", lambda: octet(npy(grey_stack(1).astype(np.float64) / 255)), 422,
         "dtype '<f8' (float64); send uint8 (0-255) or little-endian float32"),
    Case("npy-wrong-dtype-int16", lambda: octet(npy(grey_stack(1).astype(np.int16))), 422, "dtype '<i2'"),
    Case("npy-big-endian-float32", lambda: octet(npy((grey_stack(1) / 255).astype(">f4"))), 422, "dtype '>f4'"),
    Case("npy-structured-dtype", lambda: octet(npy(np.zeros(2, dtype=[("a", "u1"), ("b", "f4")]))), 422,
         "dtype"),
    Case("npy-nan", lambda: octet(npy(np.where(np.eye(28, dtype=bool), np.nan, 0.5).astype(np.float32)[None])),
         422, "28 non-finite values (NaN or infinity)"),
    Case("npy-infinity", lambda: octet(npy(np.full((1, 28, 28), np.inf, np.float32))), 422, "non-finite"),
    Case("npy-float-out-of-range", lambda: octet(npy(grey_stack(1).astype(np.float32))), 422,
         "float32 pixels must be in [0, 1]; the .npy array has values from 0 to 255"),
    Case("npy-negative-float", lambda: octet(npy(np.full((1, 28, 28), -0.5, np.float32))), 422, "from -0.5"),
    Case("npy-wrong-image-size", lambda: octet(npy(np.zeros((2, 32, 32), np.uint8))), 422,
         "shape (2, 32, 32); the model takes (N, 28, 28) or (N, 1, 28, 28) (arrays are not resized"),
    Case("npy-one-image-without-batch-axis", lambda: octet(npy(grey())), 422, "shape (28, 28); the model takes"),
    Case("npy-three-channels", lambda: octet(npy(np.zeros((1, 3, 28, 28), np.uint8))), 422,
         "shape (1, 3, 28, 28); the model takes"),
    Case("npy-five-dims", lambda: octet(npy(np.zeros((1, 1, 1, 28, 28), np.uint8))), 422, "the model takes"),
    Case("npy-zero-images", lambda: octet(npy(np.zeros((0, 28, 28), np.uint8))), 422, "no images"),
    Case("npy-too-many-images", lambda: octet(npy(grey_stack(MAX_IMAGES + 1))), 413,
         f"{MAX_IMAGES + 1} images in one request; at most {MAX_IMAGES}"),
    Case("npy-claims-huge-shape", lambda: octet(npy_with_header(
        b"{'descr': '|u1', 'fortran_order': False, 'shape': (4, 100000, 100000), }")), 422, "the model takes"),
    # --- methods and paths
    Case("get-detect", lambda: {}, 405, "method GET is not allowed on /detect; use POST", method="GET",
         check=_allow_post),
    Case("put-detect", lambda: one_file(good_png()), 405, "method PUT is not allowed", method="PUT"),
    Case("post-health", lambda: {}, 405, "use GET", path="/health"),
    Case("delete-model", lambda: {}, 405, "method DELETE is not allowed on /model", method="DELETE", path="/model"),
    Case("unknown-path", lambda: {}, 404, "no such endpoint: /detekt", path="/detekt"),
    # --- awkward but valid: accepted after conversion
    Case("cmyk-jpeg", lambda: one_file(cmyk_jpeg(), "cmyk.jpg", "image/jpeg"), 200),
    Case("png-16-bit", lambda: one_file(png16()), 200, same_as=grey),
    Case("png-alpha-opaque", lambda: one_file(png_alpha(False)), 200, same_as=grey),
    Case("png-alpha-transparent", lambda: one_file(png_alpha(True)), 200, same_as=expected_alpha_pixels),
    Case("png-grey-alpha", lambda: one_file(encode(Image.fromarray(grey()).convert("LA"), "PNG")), 200,
         same_as=grey),
    Case("palette-png", lambda: one_file(encode(Image.fromarray(grey()).convert("P"), "PNG")), 200, same_as=grey),
    Case("bilevel-png", lambda: one_file(encode(Image.fromarray(grey()).convert("1"), "PNG")), 200),
    Case("rgb-png", lambda: one_file(encode(Image.fromarray(grey()).convert("RGB"), "PNG")), 200, same_as=grey),
    Case("bmp", lambda: one_file(encode(grey(), "BMP"), "a.bmp", "image/bmp"), 200, same_as=grey),
    Case("webp-lossless", lambda: one_file(encode(grey(), "WEBP", lossless=True), "a.webp", "image/webp"), 200,
         same_as=grey),
    Case("gif-single-frame", lambda: one_file(encode(grey(), "GIF"), "a.gif", "image/gif"), 200, same_as=grey),
    Case("jpeg", lambda: one_file(encode(grey(), "JPEG", quality=95), "a.jpg", "image/jpeg"), 200),
    Case("wrong-size-resized", lambda: {**one_file(encode(np.zeros((32, 40), np.uint8), "PNG")),
                                        "params": {"resize": "true"}}, 200, check=_resized),
    Case("data-url", lambda: as_json({"images": [{"data": "data:image/png;base64," + b64(good_png())}]}), 200,
         same_as=grey),
    Case("base64-with-line-breaks", lambda: as_json({"images": [{"data": base64.encodebytes(good_png()).decode()}]}),
         200, same_as=grey),
    Case("exif-orientation-applied", lambda: one_file(exif_rotated_png()), 200, same_as=grey),
    Case("long-filename-cut", lambda: one_file(good_png(), "n" * 400 + ".png"), 200, check=_filename_cut),
    Case("declared-type-ignored", lambda: one_file(good_png(), "x.txt", "text/plain"), 200, same_as=grey),
    Case("octet-png", lambda: octet(good_png()), 200, same_as=grey),
    Case("octet-jpeg-resized", lambda: {**octet(encode(np.zeros((40, 40), np.uint8), "JPEG")),
                                        "params": {"resize": "true"}}, 200, check=_resized),
    Case("npy-uint8", lambda: octet(npy(grey_stack(1))), 200, same_as=grey),
    Case("npy-uint8-with-channel-axis", lambda: octet(npy(grey_stack(1)[:, None])), 200, same_as=grey),
    Case("npy-float32", lambda: octet(npy((grey_stack(1).astype(np.float32) / 255))), 200, same_as=grey),
    Case("npy-fortran-order", lambda: octet(npy(np.asfortranarray(grey_stack(1)))), 200, same_as=grey),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_corpus(case: Case, client, bundle):
    response = client.request(case.method, case.path, **case.build())
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if case.status >= 400:
        assert isinstance(body["detail"], str) and case.needle in body["detail"], body
    else:
        (result,) = body["results"]
        assert result["index"] == 0 and 0 <= result["predicted_class"] < 10
        if case.same_as is not None:
            pixels = torch.from_numpy(case.same_as().astype(np.float32) / 255.0)[None, None]
            expected = offline_inspector(bundle).inspect(pixels)[0]
            assert result["predicted_class"] == expected.predicted_class
            assert result["score"] == pytest.approx(expected.score, rel=1e-4, abs=1e-5)
    if case.check is not None:
        case.check(response)
    assert client.get("/health").status_code == 200


def test_the_corpus_is_big_enough():
    assert sum(c.status >= 400 for c in CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


def test_no_5xx_was_answered_to_any_of_the_corpus(client):
    # Runs after the corpus (file order): the server's own count of 5xx answers.
    text = client.get("/metrics").text
    five_hundreds = [line for line in text.splitlines()
                     if line.startswith("pathguard_requests_total") and 'status="5' in line]
    assert five_hundreds == []
