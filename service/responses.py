"""The one place that turns what the detector library answers into what the
API answers: an ``Inspection`` (with its upload and decoded image) into a
/detect result item, a request's inspections into the /detect body, and a
loaded ``Inspector`` into the /model body.  The shapes are the models of
``schemas.py``; the contract is docs/contracts.md (HTTP contract).
"""

from __future__ import annotations

import math

from pathguard.detector.inspection import Inspection, Inspector

from .body import Upload
from .images import DecodedImage
from .schemas import ImageResult, ModelInfo
from .settings import Settings


def image_result(upload: Upload, decoded: DecodedImage, inspection: Inspection, include_path: bool) -> dict:
    """One /detect result; ``layer_paths`` only when it was asked for."""
    ins = inspection
    item = ImageResult(
        index=upload.index, filename=upload.filename, predicted_class=ins.predicted_class, label=ins.label,
        confidence=ins.confidence, adversarial=ins.adversarial, score=ins.score,
        threshold=ins.threshold, layer_deviations=ins.layer_deviations,
        active_fraction=ins.active_fraction, resized=decoded.resized,
        layer_paths=ins.layer_paths if include_path else None,
    ).model_dump()
    if not include_path:
        item.pop("layer_paths")
    return item


def detect_response(uploads: list[Upload], decoded: list[DecodedImage], inspections: list[Inspection],
                    include_path: bool, digest: str) -> dict:
    """The /detect body: the results in request order and the bundle's digest."""
    results = [image_result(up, dec, ins, include_path) for up, dec, ins in zip(uploads, decoded, inspections)]
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
    )
    return info.model_dump()
