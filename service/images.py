"""Decoding uploaded images into the model's input layout.

``decode_image(data, spec, index=..., filename=...)`` turns the bytes of one
PNG, JPEG, GIF, BMP or WebP file into a float tensor (C, H, W) in [0, 1]
with the model's channel count.  Everything that can go wrong raises
``ImageError`` naming the image (its index in the request and its file
name) and what is wrong with it; nothing else escapes (any unexpected
decoder failure is reported as an unreadable image).

Choices, in the order they are applied:

* **Format** is sniffed from the bytes, never taken from a file name or a
  declared content type.  Only PNG, JPEG, GIF, BMP and WebP are opened.
* **Size limits first.**  The header's width x height is checked against
  ``max_pixels`` before any pixel is decoded (decompression bombs), and a
  zero-size image is refused.  Pillow's own ``MAX_IMAGE_PIXELS`` guard is
  set to the same limit (``configure_pillow``) as a second line.
* **Animated images are refused** (GIF, APNG, WebP with more than one
  frame): which frame to score is the client's decision, not ours.
* **Orientation**: an EXIF orientation tag is applied (the image is scored
  the way a viewer shows it).
* **Size**: an image whose (oriented) size differs from the model's input is
  refused unless the request asks for ``resize``; then it is brought to the
  input size by one of the rules of the training data loaders
  (``pathguard.detector.data.fit_size``, the same code) and reported as
  ``resized``:

  - ``pad`` (the default): scaled, keeping the aspect ratio, until its
    longer side fits; centred; the rest filled with the mean of the image's
    outermost rows and columns (black for an item on a black background);
  - ``crop``: the largest centred region with the input's aspect ratio,
    scaled to the input (the edges of the longer side are cut off);
  - ``stretch``: scaled to the input; the aspect ratio is not kept.

  Scaling is Pillow's bilinear filter in float (antialiased when shrinking),
  after the colour conversion below; a square image comes out the same
  under all three rules.
* **Colour**: palette images are expanded; CMYK and YCbCr go through
  Pillow's conversion to RGB; a 1-channel model gets ITU-R 601-2 luma
  (Pillow's ``L``), a 3-channel model gets RGB (grey is replicated).
* **Alpha** (RGBA, LA, palette with a transparent index) is composited onto
  a uniform background of grey level ``alpha_background`` (default 0,
  black: the background of Fashion-MNIST and MNIST, so a cut-out object on
  a transparent background looks like the training data).
* **16-bit** grey PNGs keep their precision: values are scaled by 1/65535,
  not clipped to 8 bits.
* Pixels become float32 in [0, 1] (8-bit values / 255), exactly as the
  dataset loaders do, so a PNG of a dataset image scores exactly like the
  image itself.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pathguard.detector.data import fit_size

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# How an image of another size is brought to the model's input (``fit_size``).
RESIZE_MODES = ("pad", "crop", "stretch")
DEFAULT_RESIZE_MODE = "pad"


class ImageError(ValueError):
    """One image of a request cannot be used; ``status`` is the HTTP status."""

    def __init__(self, index: int, filename: str | None, message: str, status: int = 422) -> None:
        self.index = index
        self.filename = filename
        self.message = message
        self.status = status
        super().__init__(f"{describe(index, filename)}: {message}")


def describe(index: int, filename: str | None) -> str:
    name = f" ({filename!r})" if filename else ""
    return f"image {index}{name}"


@dataclass(frozen=True)
class ImageSpec:
    """What the model takes and how far the decoder may go."""

    channels: int
    height: int
    width: int
    max_pixels: int = 4096 * 4096
    alpha_background: int = 0

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"only 1- and 3-channel models are supported, not {self.channels}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


def configure_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb guard, at our limit.  Pillow warns
    above it and raises above twice it; we check the header ourselves first."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    # Between the limit and twice it Pillow only warns; our own header check
    # refuses those images with a better message, so the warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    tensor: torch.Tensor  # float32 (C, H, W) in [0, 1]
    resized: bool
    original_size: tuple[int, int]  # (width, height) as shown, before resizing


def resize_rule(resize: bool | str | None) -> str | None:
    """The rule ``decode_image`` applies to an image of another size: None
    (refuse it) for False/None/"none", the default mode ("pad") for True,
    else the mode named ("pad", "crop" or "stretch")."""
    if resize is None or resize is False or resize == "none":
        return None
    if resize is True:
        return DEFAULT_RESIZE_MODE
    if isinstance(resize, str) and resize in RESIZE_MODES:
        return resize
    raise ValueError(f"resize must be a bool or one of {RESIZE_MODES}, got {resize!r}")


def resize_request(resize: bool | None, resize_mode: str | None, body_resize: bool = False,
                   body_mode: str | None = None) -> bool | str:
    """What a /detect request asks of ``decode_image``, from the query's
    ``resize`` and ``resize_mode`` and the body's (form fields or JSON):
    False (refuse another size) unless either asks for ``resize``; then the
    query's mode, else the body's, else the default ("pad").  A mode alone
    does not ask for resizing."""
    if not (resize or body_resize):
        return False
    return resize_mode or body_mode or DEFAULT_RESIZE_MODE


def decode_image(data: bytes, spec: ImageSpec, *, index: int = 0, filename: str | None = None,
                 resize: bool | str = False) -> DecodedImage:
    """One upload as the model's input.  ``resize``: False refuses an image
    of another size; True resizes it by the default rule ("pad"); "pad",
    "crop" or "stretch" names the rule (see the module's docstring)."""
    rule = resize_rule(resize)

    def fail(message: str, status: int = 422) -> ImageError:
        return ImageError(index, filename, message, status)

    if not data:
        raise fail("empty file (0 bytes)")
    size = declared_size(data, sniff_format(data))
    if size is not None:  # PNG, GIF, BMP: check the header before Pillow sees the file
        _check_size(size[0], size[1], spec, fail)
    if sniff_format(data) == "PNG":
        # Pillow decodes a PNG cut inside its trailing chunks without a word;
        # verify() checks the chunk CRCs up to IEND, so a cut file is refused.
        try:
            probe = Image.open(io.BytesIO(data), formats=("PNG",))
        except Exception:  # noqa: BLE001 - reported with the header message below
            probe = None
        if probe is not None:
            with probe:
                try:
                    probe.verify()
                except Exception as exc:  # noqa: BLE001 - a broken PNG is the upload's fault
                    raise fail(f"truncated or corrupt PNG ({type(exc).__name__}: {exc})") from None
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise fail(f"image is too large: over the limit of {spec.max_pixels} pixels "
                   f"(possible decompression bomb; {exc})") from None
    except UnidentifiedImageError:
        raise fail(_unidentified(data)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the upload's fault
        kind = sniff_format(data) or "image"
        raise fail(f"truncated or corrupt {kind} header ({type(exc).__name__}: {exc})") from None
    with img:
        return _decode_opened(img, spec, rule, fail)


def _check_size(width: int, height: int, spec: ImageSpec, fail) -> None:
    if width < 0 or height < 0:
        raise fail(f"invalid image size {width}x{height} in its header")
    if width == 0 or height == 0:
        raise fail(f"zero-size image ({width}x{height} pixels)")
    if width * height > spec.max_pixels:
        raise fail(f"image is too large: {width}x{height} = {width * height} pixels, over the limit of "
                   f"{spec.max_pixels} pixels (possible decompression bomb)")


def _decode_opened(img: Image.Image, spec: ImageSpec, rule: str | None, fail) -> DecodedImage:
    width, height = img.size
    _check_size(width, height, spec, fail)
    frames = getattr(img, "n_frames", 1) if getattr(img, "is_animated", False) else 1
    if frames > 1:
        raise fail(f"animated {img.format} with {frames} frames; send a single still image")
    try:
        orientation = int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
        orientation = 1
    shown = (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)
    wanted = (spec.width, spec.height)
    if shown != wanted and rule is None:
        raise fail(f"size {shown[0]}x{shown[1]} does not match the model's input "
                   f"{spec.width}x{spec.height}; send {spec.width}x{spec.height} images or ask for resize=true "
                   f"(resize_mode: {', '.join(RESIZE_MODES)}; default {DEFAULT_RESIZE_MODE})")
    try:
        img.load()
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
        array = _to_array(img, spec)
        if shown != wanted:
            array = fit_size(array, (spec.height, spec.width), rule)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise fail(f"image is too large (possible decompression bomb; {exc})") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise fail(f"truncated or corrupt {img.format} data ({exc})") from None
    except Exception as exc:  # noqa: BLE001
        raise fail(f"cannot decode {img.format} image ({type(exc).__name__}: {exc})") from None
    if not np.isfinite(array).all():
        raise fail("image has non-finite pixel values")
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return DecodedImage(tensor, shown != wanted, shown)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)


def sniff_format(data: bytes) -> str | None:
    """The format a file's magic number claims (None if unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def declared_size(data: bytes, kind: str | None) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF or BMP header, read without Pillow."""
    try:
        if kind == "PNG" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if kind == "GIF":
            return struct.unpack("<HH", data[6:10])
        if kind == "BMP" and struct.unpack("<I", data[14:18])[0] >= 40:
            w, h = struct.unpack("<ii", data[18:26])
            return w, abs(h)
    except struct.error:
        return None
    return None


def _unidentified(data: bytes) -> str:
    """Why Pillow could not identify ``data``, as precisely as we can tell."""
    kind = sniff_format(data)
    if kind is None:
        return f"not a recognised image ({len(data)} bytes); supported formats: {', '.join(FORMATS)}"
    if kind not in FORMATS:
        return f"{kind} images are not supported; supported formats: {', '.join(FORMATS)}"
    return f"truncated or corrupt {kind} header ({len(data)} bytes)"


def _to_array(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] in the model's channel layout, at the
    image's own size (the pixel rules of the training loaders; resizing is
    ``fit_size``'s, afterwards)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey (PNG): keep the precision.  Mode "I" only comes from
        # 16-bit sources among the formats we open; clip defensively.
        grey = img.convert("F") if img.mode != "F" else img
        array = np.clip(np.asarray(grey, dtype=np.float32) / 65535.0, 0.0, 1.0)[:, :, None]
        return np.repeat(array, spec.channels, axis=2) if spec.channels == 3 else array
    if img.mode == "F":
        array = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)[:, :, None]
        return np.repeat(array, spec.channels, axis=2) if spec.channels == 3 else array

    if _has_alpha(img):
        rgba = img.convert("RGBA")
        level = spec.alpha_background
        background = Image.new("RGBA", rgba.size, (level, level, level, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    elif img.mode == "P":
        img = img.convert("RGB")
    target = "L" if spec.channels == 1 else "RGB"
    if img.mode != target:
        # CMYK, YCbCr, 1 (bilevel), L -> RGB, RGB -> L (luma), ...
        img = img.convert(target)
    array = np.asarray(img, dtype=np.uint8).astype(np.float32) / 255.0
    return array[:, :, None] if array.ndim == 2 else array


def _has_alpha(img: Image.Image) -> bool:
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    if img.mode == "P":
        return img.has_transparency_data
    return "transparency" in img.info and img.mode in ("L", "RGB")
