"""The fast 2x2 max-pool (detector/models.max_pool_2x2) is max_pool2d, bit for bit.

Every forward pass of the models goes through it, so any difference would
move every stored score; it is checked against torch's own max_pool2d on
random maps of the shapes the models pool (even and odd sizes), on ties,
NaN and infinities, on channels-last and non-contiguous inputs, and on a
whole forward pass of the shipped model; under autograd its gradient must
be max_pool2d's, bit for bit, and attacks on the shipped model unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pathguard.detector.models import max_pool_2x2


@pytest.mark.parametrize("shape", [(8, 32, 28, 28), (3, 64, 14, 14), (5, 128, 7, 7), (1, 1, 3, 3), (2, 4, 2, 5)])
def test_equals_max_pool2d_bit_for_bit(shape):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).relu()  # ReLU outputs: many exact ties at zero
    fast, reference = max_pool_2x2(x), F.max_pool2d(x, 2)
    assert fast.shape == reference.shape
    assert torch.equal(fast, reference)


def test_special_values_and_layouts():
    x = torch.randn(4, 6, 9, 9, generator=torch.Generator().manual_seed(1))
    x[0, 0, 0, 1] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    x[2, 3, 4, 5] = float("-inf")
    x[3] = 0.0
    reference = F.max_pool2d(x, 2)
    fast = max_pool_2x2(x)
    assert torch.equal(fast.isnan(), reference.isnan())
    assert torch.equal(torch.nan_to_num(fast), torch.nan_to_num(reference))
    assert fast[0, 0, 0, 0].isnan()
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.nan_to_num(max_pool_2x2(channels_last)), torch.nan_to_num(reference))
    strided = torch.randn(2, 3, 16, 16)[:, :, ::2, ::2]  # non-contiguous view
    assert torch.equal(max_pool_2x2(strided), F.max_pool2d(strided, 2))


@pytest.mark.parametrize("shape", [(8, 32, 28, 28), (3, 64, 14, 14), (5, 128, 7, 7), (2, 4, 5, 5)])
def test_gradient_equals_max_pool2d_bit_for_bit(shape):
    """Under autograd the same values and the same gradient, ties included
    (max_pool2d sends a window's gradient to its first maximum)."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator).relu()  # exact ties at zero in many windows
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = x[0, 0, 1, 0] = 2.0  # and a tie of three nonzero values
    upstream = torch.randn(F.max_pool2d(x, 2).shape, generator=generator)
    ours, reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = max_pool_2x2(ours)
    (out * upstream).sum().backward()
    (F.max_pool2d(reference, 2) * upstream).sum().backward()
    assert torch.equal(out, F.max_pool2d(x, 2))
    assert torch.equal(ours.grad, reference.grad)
    assert ours.grad[0, 0, 0, 0] == upstream[0, 0, 0, 0] and ours.grad[0, 0, 0, 1] == 0


def test_nan_under_autograd_is_max_pool2d():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 1] = x[0, 0, 1, 1] = float("nan")
    ours, reference = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    max_pool_2x2(ours).sum().backward()
    F.max_pool2d(reference, 2).sum().backward()
    assert torch.equal(ours.grad, reference.grad)


def test_attacks_are_unchanged(shipped_bundle_images):
    """The input gradient of the shipped model, and so PGD's adversarial
    examples, are bit-identical whichever pool computes them."""
    import pathguard.detector.models as models
    from pathguard.attacks.generate import generate_attack_set

    bundle, images = shipped_bundle_images
    model, images = bundle.decoupled.eval(), images[:16]
    labels = model(images).argmax(1)

    def run():
        x = images.clone().requires_grad_(True)
        gradient, = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
        return gradient, generate_attack_set(model, images, labels, "pgd", seed=0, progress=False,
                                             overrides={"steps": 5}).adversarial

    fast = run()
    original = models.max_pool_2x2
    models.max_pool_2x2 = lambda t: F.max_pool2d(t, 2)
    try:
        reference = run()
    finally:
        models.max_pool_2x2 = original
    assert torch.equal(fast[0], reference[0])
    assert torch.equal(fast[1], reference[1])


def test_shipped_model_forward_unchanged(shipped_bundle_images):
    """The shipped model's logits, gates and block activations are the same
    whichever pool computes them."""
    import pathguard.detector.models as models

    bundle, images = shipped_bundle_images
    model = bundle.decoupled.eval()
    with torch.inference_mode():
        fast = model.trace(images, keep_blocks=True, keep_activations=True)
    original = models.max_pool_2x2
    models.max_pool_2x2 = lambda t: F.max_pool2d(t, 2)
    try:
        with torch.inference_mode():
            reference = model.trace(images, keep_blocks=True, keep_activations=True)
    finally:
        models.max_pool_2x2 = original
    assert torch.equal(fast.logits, reference.logits)
    for a, b in zip(fast.gate_logits, reference.gate_logits):
        assert torch.equal(a, b)
    for a, b in zip(fast.activations, reference.activations):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def shipped_bundle_images():
    from pathguard.detector.bundle import DEFAULT_BUNDLE, load_bundle
    from pathguard.detector.data import load_dataset

    return load_bundle(DEFAULT_BUNDLE), load_dataset("fashion-mnist", "test").images[:64].float()
