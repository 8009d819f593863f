"""An image's answer does not depend on what else shares its batch.

CPU convolutions and matrix products pick their algorithm, and with it the
order of their additions, by the batch's shape: before the fix the same image
scored alone and inside a batch differed in its last bits (its score by up to
~1e-5 here), so near the threshold its flag could depend on the traffic
around it.  ``Inspector`` now runs every forward pass and the scoring on
``chunk`` images (the last chunk padded) in one memory layout, so every
computation has one shape.

Checked bit for bit (==, not approximately) on the first 64 Fashion-MNIST
test images and the shipped bundle: each image alone, inside one batch of
64, inside batches of 7 with other images (at every position), and through
the live service's micro-batcher under concurrent requests of mixed sizes and
body types (JSON, multipart, octet-stream file, .npy), coalesced with each
other.  Every figure of the answer is compared: score, flag, class,
confidence, layer deviations, active fraction and the channels' p-values.
A lone image and a short batch run in a smaller pass where that is measured
to give the same bits (``Inspector.pass_sizes``); checked here against an
inspector that always pads to the full pass, and with a pass size made to
differ in one bit, which must then never be used.

All of it for both forward engines (docs/method.md, "Inference engines"):
the dense passes above, and the skipping engine the service uses on the
CPU, which computes every image alone and only scores in passes.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import random

import httpx
import numpy as np
import pytest
import torch

from pathguard.detector.bundle import DEFAULT_BUNDLE
from pathguard.detector.inspection import Inspection, Inspector

from service_fixtures import LiveServer, fmnist_images, png_of, to_uint8

torch.set_num_threads(1)

N = 64


def figures(ins: Inspection) -> tuple:
    p_values = (ins.evidence or {}).get("p_values") or {}
    return (ins.score, ins.adversarial, ins.predicted_class, ins.confidence, tuple(ins.layer_deviations),
            ins.active_fraction, tuple(sorted(p_values.items())))


def answer_figures(result: dict) -> tuple:
    p_values = (result.get("evidence") or {}).get("p_values") or {}
    return (result["score"], result["adversarial"], result["predicted_class"], result["confidence"],
            tuple(result["layer_deviations"]), result["active_fraction"], tuple(sorted(p_values.items())))


@pytest.fixture(scope="module", params=["sparse", "dense"])
def inspector(request) -> Inspector:
    # both forward engines (pathguard.detector.inspection): the service's default on the CPU computes
    # each image alone and skips switched-off filters; the dense one runs whole passes
    inspector = Inspector.load(DEFAULT_BUNDLE, engine=request.param)
    assert inspector.engine == request.param
    return inspector


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return fmnist_images(N).clone()


@pytest.fixture(scope="module")
def alone(inspector, images) -> list[tuple]:
    """Each image scored on its own."""
    return [figures(inspector.inspect(images[i:i + 1])[0]) for i in range(N)]


def test_alone_equals_inside_a_batch_of_64(inspector, images, alone):
    together = [figures(ins) for ins in inspector.inspect(images)]
    mismatched = [i for i in range(N) if together[i] != alone[i]]
    assert mismatched == [], f"images {mismatched} score differently alone and in a batch of 64"


def test_alone_equals_inside_batches_of_7_with_other_images(inspector, images, alone):
    rng = random.Random(0)
    mismatched = []
    for i in range(N):
        others = rng.sample([j for j in range(N) if j != i], 6)
        position = i % 7  # every position of the batch, over the images
        index = others[:position] + [i] + others[position:]
        got = figures(inspector.inspect(images[index])[position])
        if got != alone[i]:
            mismatched.append(i)
    assert mismatched == [], f"images {mismatched} score differently inside a batch of 7"


def test_other_batch_sizes_and_repeats_agree(inspector, images, alone):
    for size in (2, 3, 5, 9, 16, 33):
        for start in range(0, N, size):
            part = list(range(start, min(N, start + size)))
            for k, ins in zip(part, inspector.inspect(images[part])):
                assert figures(ins) == alone[k], f"image {k} differs inside a batch of {len(part)}"
    assert [figures(ins) for ins in inspector.inspect(images[:8])] == alone[:8]


def test_small_passes_give_the_bits_of_full_passes(inspector, images, alone):
    # A lone image or a short batch runs in the smallest pass size measured to give the same bits as
    # a full pass (pathguard.detector.inspection); against an inspector that always pads to the full
    # chunk, every figure of every answer is the same, alone and in short batches.
    padded = Inspector.load(DEFAULT_BUNDLE, small_passes=False, engine=inspector.engine)
    assert padded.pass_sizes() == [padded.chunk]
    assert inspector.pass_sizes()[-1] == inspector.chunk
    full = [figures(padded.inspect(images[i:i + 1])[0]) for i in range(N)]
    assert full == alone
    for size in (2, 3, 5):
        got = [figures(ins) for start in range(0, N, size) for ins in inspector.inspect(images[start:start + size])]
        assert got == full, f"batches of {size} differ from full passes"


@pytest.mark.parametrize("engine", ["sparse", "dense"])
def test_a_pass_size_that_changes_a_bit_is_never_used(monkeypatch, engine):
    inspector = Inspector.load(DEFAULT_BUNDLE, engine=engine)
    real = Inspector._inspect_chunk

    def off_by_a_bit_at_3(self, part, rows, include_path):
        answers = real(self, part, rows, include_path)
        if len(part) == 3:  # as if a kernel added in another order for passes of 3
            for answer in answers:
                answer.score = float(np.nextafter(answer.score, np.inf))
        return answers

    monkeypatch.setattr(Inspector, "_inspect_chunk", off_by_a_bit_at_3)
    sizes = inspector.pass_sizes()
    assert 3 not in sizes and sizes[-1] == inspector.chunk
    calls = []
    monkeypatch.setattr(Inspector, "_inspect_chunk",
                        lambda self, part, rows, include_path: calls.append(len(part)) or real(self, part, rows,
                                                                                               include_path))
    inspector.inspect(torch.zeros((3, 1, 28, 28)))
    assert calls == [min(s for s in sizes if s >= 3)] and calls[0] != 3


def test_row_padded_linear_computes_what_the_linear_does():
    from pathguard.detector.inspection import RowPaddedLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4)
    padded = RowPaddedLinear(linear, rows=8)
    x = torch.randn(3, 16)
    out = padded(x)
    assert out.shape == (3, 4) and (padded.in_features, padded.out_features) == (16, 4)
    assert torch.equal(out, linear(torch.cat([x, torch.zeros(5, 16)]))[:3])
    torch.testing.assert_close(out, linear(x))
    wide = torch.randn(9, 16)
    assert torch.equal(padded(wide), linear(wide))


def test_the_memory_layout_of_the_input_does_not_matter(inspector, images, alone):
    # The same pixels with channels-last strides (what a permuted (N, H, W, C) array gives): the
    # convolutions would pick another algorithm for them; the inspector lays every batch out alike.
    n, c, h, w = images.shape
    channels_last = torch.empty_strided((n, c, h, w), (h * w * c, 1, w * c, c))
    channels_last.copy_(images)
    assert channels_last.stride() != images.stride() and torch.equal(channels_last, images)
    assert [figures(ins) for ins in inspector.inspect(channels_last)] == alone


# ------------------------------------------------------------ live service

def npy_body(pixels: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.stack([to_uint8(p) for p in pixels]))
    return buffer.getvalue()


def request_for(kind: str, index: list[int], images: torch.Tensor) -> dict:
    picked = images[index]
    if kind == "octet":
        return {"content": png_of(picked[0]), "headers": {"content-type": "application/octet-stream"}}
    if kind == "npy":
        return {"content": npy_body(picked), "headers": {"content-type": "application/octet-stream"}}
    if kind == "multipart":
        return {"files": [("files", (f"{i}.png", png_of(images[i]), "image/png")) for i in index]}
    return {"json": {"images": [{"data": base64.b64encode(png_of(images[i])).decode()} for i in index]}}


def plan_requests(seed: int) -> list[tuple[str, list[int]]]:
    """Every image alone once (octet-stream), and again inside requests of 2 to
    9 images of every body type, in a shuffled order."""
    rng = random.Random(seed)
    plans: list[tuple[str, list[int]]] = [("octet", [i]) for i in range(N)]
    order = list(range(N))
    rng.shuffle(order)
    kinds = ["json", "multipart", "npy"]
    start = 0
    while start < N:
        size = rng.randint(2, 9)
        plans.append((kinds[len(plans) % 3], order[start:start + size]))
        start += size
    rng.shuffle(plans)
    return plans


async def send_all(url: str, plans: list[tuple[str, list[int]]], images: torch.Tensor, clients: int) -> list:
    queue: asyncio.Queue = asyncio.Queue()
    for k, plan in enumerate(plans):
        queue.put_nowait((k, plan))
    answers: list = [None] * len(plans)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while not queue.empty():
                k, (kind, index) = queue.get_nowait()
                answers[k] = await c.post("/detect", **request_for(kind, index, images))

    await asyncio.gather(*(client() for _ in range(clients)))
    return answers


def test_live_micro_batcher_answers_bit_identically(inspector, images, alone):
    from pathguard.service.settings import Settings

    settings = Settings(bundle=DEFAULT_BUNDLE, batching=True, batch_size=64, batch_wait_ms=20, torch_threads=1,
                        inference_workers=2,  # two processes: which one answers must not matter either
                        engine=inspector.engine)
    with LiveServer(settings) as live:
        for seed in (0, 1):
            plans = plan_requests(seed)
            answers = asyncio.run(send_all(live.url, plans, images, clients=16))
            for (kind, index), response in zip(plans, answers):
                assert response.status_code == 200, response.text
                results = response.json()["results"]
                assert len(results) == len(index)
                for result, i in zip(results, index):
                    assert answer_figures(result) == alone[i], (
                        f"image {i} ({kind} request of {len(index)}) differs from its answer alone")
        metrics = httpx.get(f"{live.url}/metrics").text
    batches = [line for line in metrics.splitlines() if line.startswith("pathguard_batch_size_count")]
    images_sum = [line for line in metrics.splitlines() if line.startswith("pathguard_batch_size_sum")]
    n_batches, n_images = float(batches[0].split()[-1]), float(images_sum[0].split()[-1])
    n_requests = sum(len(plan_requests(seed)) for seed in (0, 1))
    assert n_batches < n_requests, "no two requests shared a forward pass: the test proves nothing"
    assert n_images / n_batches > 1.5


def test_engine_choice():
    from pathguard.detector.bundle import load_bundle, load_detector
    from pathguard.detector.inspection import resolve_engine
    from pathguard.service.settings import Settings

    bundle = load_bundle(DEFAULT_BUNDLE)
    model, detector = bundle.decoupled, load_detector(bundle)
    assert resolve_engine("auto", model, detector) == "sparse"  # a gated model on the CPU
    assert resolve_engine("dense", model, detector) == "dense"
    with pytest.raises(ValueError, match="engine must be one of"):
        resolve_engine("fast", model, detector)
    with pytest.raises(ValueError, match="gated model"):  # the plain network has no path to skip by
        resolve_engine("sparse", bundle.plain, detector)

    class ReadsActivations:  # a detector that needs every activation map cannot be fed image by image
        name, requires = "nic", frozenset({"activations"})

    off_cpu = copy.deepcopy(model).to("meta")  # stands in for a GPU: any device but the CPU
    assert resolve_engine("auto", off_cpu, detector) == "dense"
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("sparse", off_cpu, detector)
    assert resolve_engine("auto", model, ReadsActivations()) == "dense"
    with pytest.raises(ValueError, match="activations"):
        resolve_engine("sparse", model, ReadsActivations())
    with pytest.raises(ValueError):
        Settings(engine="fast")

