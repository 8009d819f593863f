"""The batched DeepFool (attacks/deepfool.py) and the BPDA attacks
(attacks/bpda.py), on a tiny gated ConvNet and on affine classifiers.

DeepFool is exact for an affine classifier: one step reaches the nearest of
the hyperplanes f_k = f_y, at distance min_k |f_k - f_y| / ||w_k - w_y||,
and the overshoot carries it (1 + overshoot) times that far.  Everything
runs on one CPU thread in a few seconds.
"""

from __future__ import annotations

import pytest
import torch
import torchattacks
from pathguard.attacks.bpda import BPDA, SoftGateSurrogate, bpda_class, keep_fooling
from pathguard.attacks.deepfool import BatchedDeepFool
from pathguard.attacks.generate import generate_attack_set
from pathguard.attacks.presets import (
    ALL_PRESETS,
    BPDA_REAL_FORWARD,
    BPDA_TEMPERATURE,
    EXTRA_PRESETS,
    PRESETS,
    attack_config,
    make_attack,
    run_attack,
)
from pathguard.detector.models import Architecture, ConvNet
from torch import nn

torch.set_num_threads(1)

TINY = Architecture("tiny", 1, 28, 10, (4, "M", 8, "M"), mean=(0.5,), std=(0.5,))


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(10, 1, 28, 28, generator=generator)
    images[9] = images[0]  # same image, another label: one original stays misclassified
    return images, torch.arange(10)


@pytest.fixture(scope="module")
def model(data) -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet(TINY, gated=True).eval()
    optimiser = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(60):
        loss = nn.functional.cross_entropy(net(data[0]), data[1])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net.eval()


def _pred(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(images).argmax(dim=1)


def _affine(seed: int, classes: int = 5, dim: int = 16) -> nn.Module:
    """A small affine classifier on 1x4x4 images with mild weights, so the
    minimal perturbation of a mid-grey image stays inside [0, 1]."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(dim, classes)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _analytic(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the minimal L2 distance to another class and that class."""
    weight, logits = net[1].weight, net(x)
    rows = torch.arange(len(x))
    f = logits - logits[rows, y][:, None]
    w = weight[None] - weight[y][:, None]
    distance = f.abs() / w.norm(dim=2)
    distance[rows, y] = float("inf")
    return distance.min(dim=1)


def test_batched_deepfool_stays_in_the_box_and_success_is_the_models(model, data):
    images, labels = data
    s = generate_attack_set(model, images, labels, "deepfool", batch_size=4, progress=False)
    assert s.adversarial.shape == images.shape and 0 <= s.adversarial.min() and s.adversarial.max() <= 1
    assert torch.equal(s.pred_adversarial, _pred(model, s.adversarial))
    assert torch.equal(s.success, (_pred(model, images) == labels) & (s.pred_adversarial != labels))
    assert s.n_success >= 1 and s.n_correct < len(images)
    wrong = s.pred_original != labels   # misclassified from the start: left as they are
    assert torch.equal(s.adversarial[wrong], images[wrong])


def test_batched_deepfool_matches_torchattacks_and_is_batch_independent(model, data):
    images, labels = data
    batched = BatchedDeepFool(model, steps=50, overshoot=0.02)(images, labels)
    reference = torchattacks.DeepFool(model, steps=50, overshoot=0.02)(images, labels)
    singly = torch.cat([BatchedDeepFool(model)(images[i:i + 1], labels[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(batched, reference, atol=1e-5)
    assert torch.allclose(batched, singly, atol=1e-5)
    paper = BatchedDeepFool(model, cumulative=True, push=1e-4)
    assert torch.allclose(paper(images, labels), torch.cat([paper(images[i:i + 1], labels[i:i + 1])
                                                            for i in range(len(images))]), atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deepfool_finds_the_minimal_perturbation_of_an_affine_classifier(seed):
    net = _affine(seed)
    x = 0.5 + 0.05 * torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    y = _pred(net, x)
    distance, nearest = _analytic(net, x, y)
    for attack, length in ((BatchedDeepFool(net, steps=50, overshoot=0.02), 1.02 * distance),
                           (BatchedDeepFool(net, overshoot=0.02, cumulative=True, push=1e-4),
                            1.02 * (distance + 1e-4))):
        adv, targets = attack.forward_return_target_labels(x, y)
        delta = (adv - x).flatten(1)
        assert torch.allclose(delta.norm(dim=1), length, rtol=1e-4)
        assert torch.equal(_pred(net, adv), nearest) and torch.equal(targets, nearest)
        weight = net[1].weight
        direction = weight[nearest] - weight[y]   # the step is along w_k - w_y
        cosine = nn.functional.cosine_similarity(delta, direction, dim=1)
        assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)


def test_deepfool_presets():
    assert PRESETS["deepfool"].attack_class is BatchedDeepFool
    assert attack_config("deepfool") == {"steps": 50, "overshoot": 0.02}
    assert EXTRA_PRESETS["deepfool-reference"].attack_class is torchattacks.DeepFool
    assert attack_config("deepfool-reference") == attack_config("deepfool")
    assert attack_config("deepfool-paper") == {"steps": 50, "overshoot": 0.02, "cumulative": True, "push": 1e-4}
    # The protocol (what `all` and the evaluation run) is unchanged; the extras are reachable by name only.
    assert not set(EXTRA_PRESETS) & set(PRESETS) and set(ALL_PRESETS) == set(PRESETS) | set(EXTRA_PRESETS)
    assert list(PRESETS) == ["fgsm", "bim", "pgd", "cw", "deepfool", "fgsm-low", "bim-low", "pgd-low"]


class _Shift(torchattacks.attack.Attack):
    """A stand-in attack: adds a fixed pattern, whatever the model."""

    def __init__(self, model, size: float = 0.3) -> None:
        super().__init__("Shift", model)
        self.size = size

    def forward(self, images, labels):
        pattern = torch.linspace(-1, 1, images[0].numel()).view_as(images[0])
        return (images + self.size * pattern).clamp(0, 1)


def test_bpda_keeps_only_what_fools_the_real_model(model, data):
    images, labels = data
    attack = bpda_class(_Shift)(model, temperature=0.5, size=0.3)
    adv = attack(images, labels)
    shifted = _Shift(model, 0.3)(images, labels)
    fooled = _pred(model, shifted) != labels
    assert 0 < fooled.sum() < len(images)   # both cases occur
    assert torch.equal(adv[fooled], shifted[fooled]) and torch.equal(adv[~fooled], images[~fooled])
    assert torch.equal(keep_fooling(model, images, shifted, labels), adv)


@pytest.mark.parametrize("name", ["fgsm-bpda", "pgd-bpda", "cw-bpda", "deepfool-bpda"])
def test_bpda_presets_succeed_only_on_the_real_model(name, model, data):
    images, labels = data
    overrides = {"steps": 5} if "steps" in attack_config(name) else {}
    s = generate_attack_set(model, images, labels, name, overrides=overrides, progress=False)
    unchanged = (s.adversarial == s.original).flatten(1).all(dim=1)
    assert torch.equal(s.success | unchanged | ~(s.pred_original == labels), torch.ones(len(images), dtype=bool))
    assert torch.equal(_pred(model, s.adversarial) != labels, s.pred_adversarial != labels)
    base = attack_config(name.removesuffix("-bpda"), overrides)
    assert s.config == {**base, "temperature": BPDA_TEMPERATURE, "real_forward": BPDA_REAL_FORWARD}
    assert not model.training


def test_surrogate_stays_in_eval_mode_and_tends_to_the_real_model(model, data):
    images, labels = data
    model.train()   # make_attack puts the model in eval mode, and the attack keeps it there
    attack = make_attack(model, "cw-bpda", steps=3)
    assert isinstance(attack, BPDA) and isinstance(attack.inner, torchattacks.CW)
    run_attack(attack, images, labels)
    assert not model.training and not attack.surrogate.training
    with pytest.raises(RuntimeError, match="eval mode"):
        attack.surrogate.train()
    with pytest.raises(ValueError, match="positive"):
        SoftGateSurrogate(model, 0.0)
    with torch.no_grad():
        real = model(images)
        assert torch.allclose(SoftGateSurrogate(model, 1e-6)(images), real, atol=1e-3)
        assert not torch.allclose(SoftGateSurrogate(model, 1.0)(images), real, atol=1e-3)


def test_real_forward_surrogate_has_real_values_and_soft_gradients(model, data):
    images = data[0][:3].clone().requires_grad_(True)
    soft = SoftGateSurrogate(model, 0.2)
    strict = SoftGateSurrogate(model, 0.2, real_forward=True)
    out = strict(images)
    assert torch.equal(out.detach(), model(images).detach())
    (grad_strict,) = torch.autograd.grad(out[:, 1].sum(), images)
    (grad_soft,) = torch.autograd.grad(soft(images)[:, 1].sum(), images)
    assert torch.allclose(grad_strict, grad_soft) and grad_soft.abs().sum() > 0
