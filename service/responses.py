"""The one place that turns what the detector library answers into what the
API answers: an ``Inspection`` (with its upload) into a /detect result item,
a request's inspections into the /detect body, and a loaded ``Inspector``
into the /model body.  The shapes are the models of ``schemas.py``
(``ImageResult``: the items are built as plain dicts with its fields, in its
order, which is several times cheaper than building the model per image;
tests/test_service.py validates answers against the model); the contract is
docs/contracts.md (HTTP contract).

``FastJSONResponse`` writes JSON with orjson (when installed), several times
faster than the json module for the /detect bodies.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse

from pathguard.detector.inspection import Inspection, Inspector

from .body import Upload
from .schemas import ModelInfo
from .settings import Settings

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency
    orjson = None


class FastJSONResponse(JSONResponse):
    """A JSONResponse rendered by orjson (finite floats, str keys: what
    /detect answers); the json module when orjson is missing."""

    def render(self, content: Any) -> bytes:
        if orjson is not None:
            return orjson.dumps(content)
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def image_result(upload: Upload, resized: bool, inspection: Inspection, include_path: bool) -> dict:
    """One /detect result (``schemas.ImageResult``); ``layer_paths`` only when it was asked for."""
    ins = inspection
    item = {
        "index": upload.index, "filename": upload.filename, "predicted_class": ins.predicted_class,
        "label": ins.label, "confidence": float(ins.confidence), "adversarial": bool(ins.adversarial),
        "score": float(ins.score), "threshold": float(ins.threshold),
        "layer_deviations": [float(d) for d in ins.layer_deviations],
        "active_fraction": float(ins.active_fraction), "resized": bool(resized),
        "evidence": ins.evidence,
    }
    if include_path:
        item["layer_paths"] = ins.layer_paths
    return item


def detect_response(uploads: list[Upload], resized: list[bool], inspections: list[Inspection],
                    include_path: bool, digest: str) -> dict:
    """The /detect body: the results in request order and the bundle's digest."""
    results = [image_result(up, rs, ins, include_path) for up, rs, ins in zip(uploads, resized, inspections)]
    return {"results": results, "model": digest}


def _finite(obj):
    """JSON-safe copy: non-finite floats (a card from elsewhere may hold them) become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def model_info(inspector: Inspector, settings: Settings) -> dict:
    """The /model body: the bundle, its detector, the limits and batching."""
    bundle, det = inspector.bundle, inspector.detector
    widths = list(inspector.model.gated_widths)
    info = ModelInfo(
        name=bundle.path.name, digest=bundle.digest, architecture=bundle.arch.name,
        classes=list(bundle.classes), input_shape=list(bundle.input_shape), gated_widths=widths,
        path_bits=sum(widths),
        detector={"score": det.name, "threshold": det.threshold_, "target_fpr": det.target_fpr},
        card=_finite(bundle.card),
        limits={"max_images": settings.max_images, "max_upload_bytes": settings.max_upload_bytes,
                "max_pixels": settings.max_pixels, "inference_timeout_s": settings.inference_timeout_s},
        batching={"enabled": settings.batching, "batch_size": settings.batch_size,
                  "batch_wait_ms": settings.batch_wait_ms, "queue_size": settings.queue_size},
        engine=inspector.engine,
    )
    return info.model_dump()
