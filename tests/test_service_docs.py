"""First contact with the service: the docs pages, their examples, the
documented input, and resizing that keeps the aspect ratio.

* /docs (Swagger UI) and /redoc load everything from the app itself: every
  script, stylesheet and icon a page references is fetched here (200 from
  the app), and no page names another host, so both work without internet.
* The /docs example is a real Fashion-MNIST image of the class its file name
  says; POSTed as it stands, the shipped model names that class and does not
  flag it, and the response examples are that answer.
* The API description says what input the model expects.
* ``resize`` brings an image to the input size by the training loaders' own
  rules (``pathguard.detector.data.fit_size``): pad (default), crop, stretch;
  the service's pixels equal ``convert_image``'s for every kind of image.

Runs in-process (FastAPI's TestClient) on the shipped bundle.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pathguard.detector.data import DatasetError, convert_image, fit_size, load_dataset
from pathguard.detector.inspection import Inspector
from pathguard.service.app import create_app
from pathguard.service.images import (
    DEFAULT_RESIZE_MODE, RESIZE_MODES, ImageError, ImageSpec, decode_image, resize_request, resize_rule)
from pathguard.service.schemas import EXAMPLE_FILENAME, EXAMPLE_PNG_BASE64, EXAMPLE_RESULT, ResizeMode
from pathguard.service.settings import Settings

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "bundles" / "fmnist-default"
SPEC = ImageSpec(1, 28, 28)
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(bundle=SHIPPED, torch_threads=1))) as c:
        yield c


@pytest.fixture(scope="module")
def inspector():
    return Inspector.load(SHIPPED)


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/openapi.json").json()


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------- offline docs

def references(html: str) -> list[str]:
    """Every URL a page loads: src/href attributes and Swagger UI's url."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    found += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    found += re.findall(r"""<redoc[^>]*spec-url=["']([^"']+)["']""", html)
    return found


@pytest.mark.parametrize("page, wanted", [
    ("/docs", {"/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css", "/openapi.json"}),
    ("/redoc", {"/static/docs/redoc.standalone.js", "/openapi.json"}),
])
def test_docs_page_loads_everything_from_the_app(client, page, wanted):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    refs = references(html)
    assert wanted <= set(refs), (page, refs)
    # No other host: not the CDN, not Google Fonts, not the Swagger validator, not a favicon.
    assert re.findall(r"(?:https?:)?//[\w.-]+", html) == [], re.findall(r"(?:https?:)?//[\w./-]+", html)
    for ref in refs:
        parts = urlsplit(ref)
        assert not parts.scheme and not parts.netloc and ref.startswith("/"), f"{page} references {ref}"
        asset = client.get(ref)
        assert asset.status_code == 200, (page, ref, asset.status_code)
        assert len(asset.content) > 100, (page, ref)
        kind = ASSET_TYPES.get(Path(parts.path).suffix)
        if kind:
            assert kind in asset.headers["content-type"], (ref, asset.headers["content-type"])


def test_swagger_ui_is_served_offline_and_renders_openapi_3_1(client, spec):
    html = client.get("/docs").text
    assert '"validatorUrl": null' in html  # no badge image from validator.swagger.io
    assert "oauth2RedirectUrl" in html and client.get("/docs/oauth2-redirect").status_code == 200
    assert spec["openapi"].startswith("3.1")
    bundle = client.get("/static/docs/swagger-ui-bundle.js").content
    assert b"isOAS31" in bundle  # Swagger UI 5: renders OpenAPI 3.1 (Swagger UI 4 refuses it)
    assert b"Redoc" in client.get("/static/docs/redoc.standalone.js").content[:2000]
    assert client.get("/static/docs/nothing.js").status_code == 404
    # the docs pages are not API operations
    assert not {"/docs", "/redoc", "/docs/oauth2-redirect"} & set(spec["paths"])


# ------------------------------------------------------------ the examples

def class_named_by(filename: str, classes: list[str]) -> str:
    """'ankle_boot.png' -> 'Ankle boot', 'shirt.png' -> 'Shirt'."""
    stem = Path(filename).stem.replace("_", " ").lower()
    (name,) = [c for c in classes if c.lower() == stem]
    return name


def example_bodies(spec: dict) -> list[dict]:
    bodies = list(spec["components"]["schemas"]["DetectRequest"]["examples"])
    content = spec["paths"]["/detect"]["post"]["requestBody"]["content"]["application/json"]
    bodies += [content["example"]] if "example" in content else []
    bodies += [e["value"] for e in content.get("examples", {}).values()]
    assert len(bodies) >= 2
    return bodies


def test_docs_example_is_a_real_image_of_the_class_it_names(client, spec):
    classes = client.get("/model").json()["classes"]
    for body in example_bodies(spec):
        response = client.post("/detect", json=body)
        assert response.status_code == 200, response.text
        for image, result in zip(body["images"], response.json()["results"], strict=True):
            assert result["filename"] == image["filename"]
            assert result["label"] == class_named_by(image["filename"], classes), result
            assert result["adversarial"] is False, result
            assert result["resized"] is False


def test_example_image_is_fashion_mnist_test_image_92():
    with Image.open(io.BytesIO(base64.b64decode(EXAMPLE_PNG_BASE64))) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "L", (28, 28))
        pixels = np.asarray(img, dtype=np.float32) / 255.0
    test = load_dataset("fashion-mnist", "test")
    assert int(test.labels[92]) == 6 and test.classes[6] == "Shirt" and EXAMPLE_FILENAME == "shirt.png"
    assert np.array_equal(pixels, test.images[92, 0].numpy())


def test_response_examples_are_the_shipped_models_answer(client, spec):
    live = client.post("/detect", json={"images": [{"data": EXAMPLE_PNG_BASE64, "filename": EXAMPLE_FILENAME}]})
    (result,) = live.json()["results"]
    properties = spec["components"]["schemas"]["ImageResult"]["properties"]
    shown = {name: prop["examples"][0] for name, prop in properties.items() if "examples" in prop}
    assert set(shown) == set(result) and list(EXAMPLE_RESULT) == list(result)
    for example in (shown, EXAMPLE_RESULT):
        for name, value in result.items():
            if isinstance(value, float) or name == "layer_deviations":
                assert example[name] == pytest.approx(value, abs=1e-5), name
            elif name == "evidence":
                assert example[name]["p_values"] == pytest.approx(value["p_values"], abs=1e-5)
                assert {**example[name], "p_values": None} == {**value, "p_values": None}
            else:
                assert example[name] == value, name
    (response_example,) = spec["components"]["schemas"]["DetectResponse"]["examples"]
    assert response_example["results"] == [EXAMPLE_RESULT]
    model = client.get("/model").json()
    assert result["threshold"] == pytest.approx(model["detector"]["threshold"], rel=1e-12)
    assert len(result["layer_deviations"]) == len(model["gated_widths"])


def test_api_description_states_the_expected_input(spec):
    description = spec["info"]["description"]
    for words in ("28x28 grey", "light on a dark (black) background", "Fashion-MNIST", "[0, 1]",
                  "composited onto black", "`pad`", "`crop`", "`stretch`", "resize=true"):
        assert words in description, words
    request = spec["components"]["schemas"]["DetectRequest"]["properties"]
    assert request["resize_mode"]["enum"] == list(RESIZE_MODES) and request["resize_mode"]["default"] == "pad"
    assert "aspect ratio" in request["resize_mode"]["description"]
    assert "black background" in spec["components"]["schemas"]["ImageIn"]["properties"]["data"]["description"]


# ------------------------------------------------------------------ resize

def test_resize_modes_agree_with_the_schema():
    assert ResizeMode.__args__ == RESIZE_MODES and DEFAULT_RESIZE_MODE == "pad"
    assert [resize_rule(v) for v in (False, None, "none", True, "pad", "crop", "stretch")] == [
        None, None, None, "pad", "pad", "crop", "stretch"]
    with pytest.raises(ValueError):
        resize_rule("squash")
    # (query resize, query resize_mode, body resize, body resize_mode) -> decode_image's resize
    assert resize_request(None, None, False, None) is False
    assert resize_request(None, "crop", False, "stretch") is False  # a mode alone does not resize
    assert resize_request(True, None) == "pad"
    assert resize_request(True, "stretch") == "stretch"
    assert resize_request(None, None, True, None) == "pad"
    assert resize_request(None, None, True, "crop") == "crop"
    assert resize_request(True, None, False, "crop") == "crop"
    assert resize_request(False, "stretch", True, "crop") == "stretch"  # the query's mode wins

def _rng_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    grey = (rng.random((21, 40)) * 255).astype(np.uint8)
    rgb = (rng.random((33, 20, 3)) * 255).astype(np.uint8)
    rgba = np.concatenate([rgb, (rng.random((33, 20, 1)) * 255).astype(np.uint8)], axis=2)
    deep = Image.fromarray((rng.random((30, 45)) * 65535).astype(np.uint16))
    assert deep.mode.startswith("I;16")
    palette = Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "grey-wide": Image.fromarray(grey, "L"),
        "grey-tall": Image.fromarray(np.ascontiguousarray(grey.T), "L"),
        "grey-square-56": Image.fromarray(np.kron(grey[:, :21], np.ones((2, 2), np.uint8))[:56, :56], "L"),
        "rgb": Image.fromarray(rgb, "RGB"),
        "rgba": Image.fromarray(rgba, "RGBA"),
        "la": Image.fromarray(rgba[:, :, [0, 3]], "LA"),
        "palette": palette,
        "grey-16bit": deep,
        "at-size": Image.fromarray(rgb[:28, :20].repeat(2, axis=1)[:, :28], "RGB"),
    }


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_service_pixels_equal_the_training_loaders(mode):
    """decode_image (any mode, any size) == data.convert_image, the loaders' code."""
    for name, img in _rng_images().items():
        buf = io.BytesIO()
        img.save(buf, "PNG")
        decoded = decode_image(buf.getvalue(), SPEC, filename=name, resize=mode)
        with Image.open(io.BytesIO(buf.getvalue())) as again:
            again.load()
            expected = convert_image(again, 1, (28, 28), mode)
        assert decoded.tensor.shape == (1, 28, 28) and decoded.tensor.dtype == torch.float32
        assert decoded.resized == (img.size != (28, 28)), name
        np.testing.assert_allclose(decoded.tensor.numpy(), expected, rtol=0, atol=1e-6, err_msg=f"{name} {mode}")
        if mode == DEFAULT_RESIZE_MODE:  # resize=True is the default mode
            same = decode_image(buf.getvalue(), SPEC, filename=name, resize=True)
            assert torch.equal(same.tensor, decoded.tensor)


def test_pad_keeps_the_aspect_ratio_and_the_black_background():
    # A light 28x14 item on a black 56x28 (w x h) image: pad halves it and fills with black.
    canvas = np.zeros((28, 56), np.uint8)
    canvas[7:21, 14:42] = 200
    data = png(canvas, "L")
    padded = decode_image(data, SPEC, resize="pad").tensor[0].numpy()
    assert padded[:7].max() == 0 and padded[21:].max() == 0     # black bands above and below
    assert padded[11:17, 8:20] == pytest.approx(np.full((6, 12), 200 / 255), abs=1e-6)
    assert np.count_nonzero(padded > 0.5) == pytest.approx(14 * 7, abs=14)  # the item, half size, shape kept
    stretched = decode_image(data, SPEC, resize="stretch").tensor[0].numpy()
    assert np.count_nonzero(stretched > 0.5) == pytest.approx(14 * 14, abs=28)  # twice as tall: distorted
    cropped = decode_image(data, SPEC, resize="crop").tensor[0].numpy()
    assert np.count_nonzero(cropped > 0.5) == pytest.approx(14 * 28, abs=28)  # the centre 28x28, whole height
    assert np.array_equal(padded, fit_size(canvas[:, :, None].astype(np.float32) / 255, (28, 28), "pad")[:, :, 0])


def test_wrong_size_without_resize_names_the_modes():
    with pytest.raises(ImageError) as info:
        decode_image(png(np.zeros((20, 30), np.uint8)), SPEC, index=2, filename="wide.png")
    assert info.value.status == 422
    assert str(info.value) == ("image 2 ('wide.png'): size 30x20 does not match the model's input 28x28; "
                               "send 28x28 images or ask for resize=true (resize_mode: pad, crop, stretch; "
                               "default pad)")
    with pytest.raises(DatasetError):  # the loaders' own 'none' rule refuses the same way
        fit_size(np.zeros((20, 30, 1), np.float32), (28, 28), "none")


def _wide_boot() -> np.ndarray:
    """Fashion-MNIST test image 0 (an ankle boot) as a 112x84 photo: rows 3-23, 4x."""
    boot = np.rint(load_dataset("fashion-mnist", "test").images[0, 0].numpy() * 255).astype(np.uint8)
    return np.kron(boot[3:24], np.ones((4, 4), np.uint8))


def test_resize_true_pads_over_http(client, inspector):
    wide = _wide_boot()
    data = png(wide, "L")
    expected_pixels = fit_size(wide[:, :, None].astype(np.float32) / 255, (28, 28), "pad")
    (expected,) = inspector.inspect(torch.from_numpy(expected_pixels.transpose(2, 0, 1).copy())[None])
    for kwargs in ({"files": [("files", ("wide.png", data, "image/png"))], "params": {"resize": "true"}},
                   {"files": [("files", ("wide.png", data, "image/png"))], "data": {"resize": "true"}},
                   {"json": {"images": [{"data": base64.b64encode(data).decode(), "filename": "wide.png"}],
                             "resize": True}}):
        response = client.post("/detect", **kwargs)
        assert response.status_code == 200, response.text
        (result,) = response.json()["results"]
        assert result["resized"] is True and result["label"] == expected.label == "Ankle boot"
        assert result["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-6)
        assert result["confidence"] == pytest.approx(expected.confidence, rel=1e-5, abs=1e-6)


def test_resize_mode_over_http(client, inspector, spec):
    """resize_mode as a query parameter, form field and JSON field."""
    names = {p["name"] for p in spec["paths"]["/detect"]["post"].get("parameters", [])}
    assert "resize_mode" in names
    wide = _wide_boot()
    data = png(wide, "L")
    b64 = base64.b64encode(data).decode()
    for mode in RESIZE_MODES:
        pixels = fit_size(wide[:, :, None].astype(np.float32) / 255, (28, 28), mode)
        (expected,) = inspector.inspect(torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None])
        files = [("files", ("wide.png", data, "image/png"))]
        for kwargs in ({"files": files, "params": {"resize": "true", "resize_mode": mode}},
                       {"files": files, "data": {"resize": "true", "resize_mode": mode}},
                       {"json": {"images": [{"data": b64}], "resize": True, "resize_mode": mode}}):
            response = client.post("/detect", **kwargs)
            assert response.status_code == 200, (mode, kwargs.keys(), response.text)
            (result,) = response.json()["results"]
            assert result["score"] == pytest.approx(expected.score, rel=1e-5, abs=1e-6), (mode, kwargs.keys())
    refused = client.post("/detect", files=[("files", ("wide.png", data, "image/png"))],
                          params={"resize": "true", "resize_mode": "squash"})
    assert refused.status_code == 422
