"""Gates (detector/gates.py), the decoupled model's gating (models.py) and
the four loss terms (detector/losses.py), checked on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathguard.detector.gates import ArchitectureControl, binary_gate, saturating_sigmoid, training_gate
from pathguard.detector.losses import (
    DecouplingWeights,
    alignment_loss,
    decoupling_loss,
    distillation_loss,
    hard_bits,
    layer_weights,
    path_class_loss,
    sparsity_loss,
)
from pathguard.detector.models import ARCHITECTURES, ConvNet

# ----------------------------------------------------------------- gates


def test_saturating_sigmoid_values():
    z = torch.tensor([-100.0, -math.log(11.0), 0.0, math.log(11.0), 100.0])
    s = saturating_sigmoid(z)
    # 1.2 * sigmoid(-log 11) - 0.1 = 1.2/12 - 0.1 = 0; 1.2 * 11/12 - 0.1 = 1
    assert torch.allclose(s, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]), atol=1e-6)
    assert float(s.min()) == 0.0 and float(s.max()) == 1.0  # reached exactly


def test_binary_gate_is_exactly_zero_one():
    z = torch.tensor([[-3.0, -1e-7, 0.0, 1e-7, 2.5], [5.0, -5.0, 0.0, 0.1, -0.1]])
    v = binary_gate(z)
    assert v.dtype == z.dtype
    assert set(v.unique().tolist()) <= {0.0, 1.0}
    assert v.tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0, 0.0]]
    big = binary_gate(torch.randn(64, 300, generator=torch.Generator().manual_seed(0)))
    assert set(big.unique().tolist()) == {0.0, 1.0}


def _replay_noise(shape, seed):
    """training_gate draws randn (noise) then rand (which positions are
    hard) from the generator: replay both."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g)
    use_hard = torch.rand(shape, generator=g) < 0.5
    return noise, use_hard


def test_training_gate_forward_and_straight_through_gradient():
    shape = (16, 40)
    z = (2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(11))).requires_grad_()
    out = training_gate(z, noise_std=1.0, generator=torch.Generator().manual_seed(5))
    assert float(out.detach().min()) >= 0.0 and float(out.detach().max()) <= 1.0

    noise, use_hard = _replay_noise(shape, 5)
    noisy = z.detach() + noise
    soft = saturating_sigmoid(noisy)
    hard = (noisy > 0).float()
    # both kinds of positions occur, and the forward value is what each should be
    assert 0 < int(use_hard.sum()) < use_hard.numel()
    assert torch.allclose(out.detach()[use_hard], hard[use_hard], atol=1e-6)
    assert torch.allclose(out.detach()[~use_hard], soft[~use_hard])
    # hard + soft - soft.detach() is the hard bit up to one float rounding
    hard_values = out.detach()[use_hard]
    assert bool(((hard_values - hard_values.round()).abs() <= 1e-6).all())

    out.sum().backward()
    # d out / d z is the soft gate's derivative at *every* position, hard ones
    # included (straight-through): 1.2 * sig * (1 - sig) where not saturated.
    sig = torch.sigmoid(noisy)
    unsaturated = (1.2 * sig - 0.1 > 0) & (1.2 * sig - 0.1 < 1)
    expected = torch.where(unsaturated, 1.2 * sig * (1 - sig), torch.zeros_like(sig))
    assert torch.allclose(z.grad, expected, atol=1e-6)
    assert bool((z.grad[unsaturated] != 0).all())
    assert bool((z.grad[unsaturated & use_hard] != 0).all())
    assert int((unsaturated & use_hard).sum()) > 0
    assert bool((z.grad[~unsaturated] == 0).all())


def test_training_gate_without_noise_is_hard_bit_or_soft_value():
    z = torch.linspace(-4, 4, 401).reshape(1, -1)
    out = training_gate(z, noise_std=0.0, generator=torch.Generator().manual_seed(2))
    hard = (z > 0).float()
    soft = saturating_sigmoid(z)
    is_hard = torch.isclose(out, hard, rtol=0.0, atol=1e-6)
    is_soft = torch.isclose(out, soft)
    assert bool((is_hard | is_soft).all())
    # both branches are used (where hard and soft differ)
    differ = ~torch.isclose(hard, soft)
    assert bool((is_hard & differ).any()) and bool((is_soft & differ).any())


def test_training_gate_seeded_is_reproducible():
    z = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    a = training_gate(z, generator=torch.Generator().manual_seed(9))
    b = training_gate(z, generator=torch.Generator().manual_seed(9))
    c = training_gate(z, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_acm_architecture_and_initial_output_by_hand():
    torch.manual_seed(0)
    acm = ArchitectureControl(32, 64)
    assert acm.fc1.in_features == 32 and acm.fc1.out_features == 8
    assert acm.fc2.in_features == 8 and acm.fc2.out_features == 64
    assert bool((acm.fc1.weight == 0).all())
    assert bool((acm.fc1.bias == 1).all()) and bool((acm.fc2.bias == 1).all())
    x = torch.randn(3, 32, 5, 5, generator=torch.Generator().manual_seed(1))
    z = acm(x)
    assert z.shape == (3, 64)
    # fc1(GAP(x)) = 0 * GAP(x) + 1 = ones; ReLU keeps ones; fc2(ones) = row sums of W2 + b2
    expected = acm.fc2.weight.detach().sum(dim=1) + 1.0
    for row in z.detach():
        assert torch.allclose(row, expected, atol=1e-6)
    # the logit does not depend on the input at initialisation
    assert torch.allclose(z, acm(5 * x + 3), atol=1e-6)
    # GAP is over the spatial dims: a constant map gives the same logit as its mean
    assert torch.equal(binary_gate(z[0]), (expected > 0).float())


def test_acm_hidden_width_at_least_one():
    acm = ArchitectureControl(2, 5)
    assert acm.fc1.out_features == 1
    # with one hidden unit, W2 ~ U(-1, 1): every logit 1 + w > 0
    assert bool((binary_gate(acm(torch.rand(1, 2, 3, 3))) == 1).all())


def test_every_filter_starts_on_in_decoupled_net():
    """docs/method.md, "Decoupled network": the ACM is initialised so that
    every filter starts switched on, so the freshly built decoupled net computes what
    the plain net it is copied from computes."""
    torch.manual_seed(0)
    model = ConvNet(ARCHITECTURES["vgg-small"], gated=True).eval()
    with torch.no_grad():
        trace = model.trace(torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    for layer, (z, v) in enumerate(zip(trace.gate_logits, trace.gates)):
        off = int((v == 0).sum(dim=1)[0])
        assert off == 0, f"gated layer {layer}: {off} of {v.shape[1]} filters start off (min logit {float(z.min()):.3f})"


def test_decoupled_model_eval_paths_binary_and_deterministic(tiny_arch):
    torch.manual_seed(0)
    model = ConvNet(tiny_arch, gated=True)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        a, b = model.trace(x), model.trace(x)
    assert a.path.shape == (6, sum(model.gated_widths)) == (6, 16)
    assert set(a.path.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(a.path, b.path) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.path, binary_gate(a.path_logits))
    # in training mode the gates are noisy: same input, different gates
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        t1 = model.trace(x)
        t2 = model.trace(x)
    assert not torch.equal(t1.path, t2.path)
    assert float(t1.path.min()) >= 0.0 and float(t1.path.max()) <= 1.0


def test_first_convolution_is_ungated(tiny_arch):
    model = ConvNet(tiny_arch, gated=True)
    assert model.blocks[0].control is None
    assert all(block.control is not None for block in model.blocks[1:])
    assert model.gated_widths == [8, 8]
    plain = ConvNet(tiny_arch, gated=False)
    assert all(block.control is None for block in plain.blocks)


def test_gate_multiplies_output_after_relu(tiny_arch):
    """o_l (kept before gating) times v_l is the gated activation."""
    torch.manual_seed(0)
    model = ConvNet(tiny_arch, gated=True).eval()
    # switch off half the filters of the last gated layer by hand
    with torch.no_grad():
        model.blocks[2].control.fc2.bias.copy_(torch.tensor([5.0, -50.0] * 4))
        model.blocks[2].control.fc2.weight.zero_()
        trace = model.trace(torch.rand(2, 1, 28, 28), keep_outputs=True, keep_activations=True)
    assert trace.gates[1].tolist() == [[1.0, 0.0] * 4] * 2
    o, act = trace.outputs[1], trace.activations[2]
    assert bool((o >= 0).all())  # after ReLU
    assert torch.equal(act, o * trace.gates[1][:, :, None, None])
    assert bool((act[:, 1::2] == 0).all())


def test_plain_weights_copy_into_decoupled(tiny_arch):
    torch.manual_seed(0)
    plain = ConvNet(tiny_arch, gated=False).eval()
    decoupled = ConvNet(tiny_arch, gated=True)
    decoupled.load_plain_weights(plain)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(decoupled.state_dict()[name], tensor)
    # all gates on (set the ACM so) -> identical logits to the plain net
    with torch.no_grad():
        for block in decoupled.blocks[1:]:
            block.control.fc2.weight.zero_()
        x = torch.rand(3, 1, 28, 28)
        assert torch.allclose(decoupled.eval()(x), plain(x), atol=1e-6)
    other = ConvNet(ARCHITECTURES["vgg-small"], gated=False)
    with pytest.raises((ValueError, RuntimeError)):
        decoupled.load_plain_weights(other)


# ---------------------------------------------------------------- losses


def test_alignment_loss_zero_when_distributions_match():
    v = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    o = v[:, :, None, None].expand(2, 4, 3, 3).clone()  # constant per channel = v
    assert float(alignment_loss(o, v)) == pytest.approx(0.0, abs=1e-7)
    # a constant shift of the output does not change its softmax either
    assert float(alignment_loss(o + 7.0, v)) == pytest.approx(0.0, abs=1e-6)


def test_alignment_loss_matches_hand_kl():
    o = torch.zeros(2, 3, 2, 2)
    o[0, 0] = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # GAP 2
    o[0, 1] = 1.0
    o[1, 2] = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # GAP 1
    v = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [x / sum(e) for x in e]

    total = 0.0
    for gap, gate in (([2.0, 1.0, 0.0], [1.0, 0.0, 0.0]), ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])):
        p, q = softmax(gap), softmax(gate)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = total / 2  # batch mean
    got = float(alignment_loss(o, v))
    assert got > 0
    assert got == pytest.approx(expected, rel=1e-5)
    # and the direction is KL(softmax(GAP(o)) || softmax(v)), not the reverse
    reverse = 0.0
    for gap, gate in (([2.0, 1.0, 0.0], [1.0, 0.0, 0.0]), ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])):
        p, q = softmax(gap), softmax(gate)
        reverse += sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert abs(reverse / 2 - expected) > 1e-3


def test_path_class_loss_is_cross_entropy_of_linear_head():
    head = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]))
    v = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    logits = torch.tensor([[3.0, -1.0], [0.0, 1.0], [3.0, 0.0]])  # W v by hand
    assert torch.allclose(head(v), logits)
    expected = sum(
        -row[t] + math.log(sum(math.exp(x) for x in row)) for row, t in zip(logits.tolist(), y.tolist())
    ) / 3
    got = path_class_loss(v, y, head)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(got, F.cross_entropy(logits, y))


def test_sparsity_loss_by_hand():
    v = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # mean L1 = (2 + 4 + 0) / 3 = 2; C = 4
    assert float(sparsity_loss(v, 0.5)) == pytest.approx(0.0, abs=1e-7)  # |2 - 2| / 4
    assert float(sparsity_loss(v, 0.0)) == pytest.approx(2 / 4)  # plain L1 / C
    assert float(sparsity_loss(v, 0.25)) == pytest.approx(abs(2 - 1) / 4)
    assert float(sparsity_loss(v, 1.0)) == pytest.approx(abs(2 - 4) / 4)
    soft = torch.tensor([[0.2, 0.7, 0.1]])
    assert float(sparsity_loss(soft, 0.1)) == pytest.approx(abs(1.0 - 0.3) / 3)


def test_sparsity_loss_gradient_sign():
    v = torch.full((2, 4), 0.9, requires_grad=True)  # too dense for rho = 0.5
    sparsity_loss(v, 0.5).backward()
    assert bool((v.grad > 0).all())  # descent lowers the gates


def test_decoupling_loss_total_is_weighted_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, 2, 1, 2])
    gates = [torch.rand(4, 5, generator=g), (torch.rand(4, 6, generator=g) > 0.5).float()]
    outputs = [torch.rand(4, 5, 2, 2, generator=g), torch.rand(4, 6, 3, 3, generator=g)]
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(5, 3, bias=False), nn.Linear(6, 3, bias=False)])
    weights = DecouplingWeights(lambda_k=0.7, lambda_m=0.3, lambda_s=2.0, target_ratio=0.4)
    total, terms = decoupling_loss(logits, labels, gates, outputs, heads, weights)

    ce = F.cross_entropy(logits, labels)
    kl = alignment_loss(outputs[0], gates[0]) + alignment_loss(outputs[1], gates[1])
    mi = path_class_loss(gates[0], labels, heads[0]) + path_class_loss(gates[1], labels, heads[1])
    sp = sparsity_loss(gates[0], 0.4) + sparsity_loss(gates[1], 0.4)
    assert float(total.detach()) == pytest.approx(float((ce + 0.7 * kl + 0.3 * mi + 2.0 * sp).detach()), rel=1e-6)
    assert float(terms["ce"]) == pytest.approx(float(ce.detach()), rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(float(kl.detach()), rel=1e-6)
    assert float(terms["mi"]) == pytest.approx(float(mi.detach()), rel=1e-6)
    assert float(terms["sp"]) == pytest.approx(float(sp.detach()), rel=1e-6)
    assert set(terms) == {"ce", "kl", "mi", "sp", "mi_0", "mi_1"}
    assert float(terms["mi_0"]) == pytest.approx(float(path_class_loss(gates[0], labels, heads[0])), rel=1e-6)
    assert not any(t.requires_grad for t in terms.values())  # logged without keeping the graph
    assert total.requires_grad
    # the decoupled model's trace feeds it directly, and gradients reach the ACMs
    total.backward()
    assert all(h.weight.grad is not None and bool((h.weight.grad != 0).any()) for h in heads)


def test_decoupling_loss_backprops_into_acm(tiny_arch):
    torch.manual_seed(0)
    model = ConvNet(tiny_arch, gated=True).train()
    heads = nn.ModuleList(nn.Linear(w, 10, bias=False) for w in model.gated_widths)
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8)
    trace = model.trace(x, keep_outputs=True)
    total, _ = decoupling_loss(trace.logits, y, trace.gates, trace.outputs, heads, DecouplingWeights())
    total.backward()
    for block in model.blocks[1:]:
        assert block.control.fc2.weight.grad is not None
        assert float(block.control.fc2.weight.grad.abs().sum()) > 0


def test_distillation_loss_is_hinton_kl():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = 3.0
    p = torch.softmax(teacher / t, dim=1)
    q = torch.softmax(student / t, dim=1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * t * t
    assert float(distillation_loss(student, teacher, t)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)


def test_hard_bits_forward_is_binary_gradient_is_sigmoid():
    z = torch.tensor([-2.0, -0.1, 0.3, 4.0], requires_grad=True)
    bits = hard_bits(z)
    assert bits.tolist() == [0.0, 0.0, 1.0, 1.0]
    bits.sum().backward()
    s = torch.sigmoid(z.detach())
    assert torch.allclose(z.grad, s * (1 - s))


def test_layer_weights_interpolate_front_to_back():
    assert layer_weights(1, 3.0) == [1.0]
    assert layer_weights(3, 3.0) == pytest.approx([3.0, 2.0, 1.0])
    assert layer_weights(4, 1.0) == pytest.approx([1.0] * 4)


def test_decoupling_loss_front_weight_hard_bits_and_distillation():
    g = torch.Generator().manual_seed(2)
    logits, teacher = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    z = [torch.randn(6, 4, generator=g), torch.randn(6, 5, generator=g)]
    gates = [torch.sigmoid(zl) for zl in z]
    outputs = [torch.rand(6, 4, 2, 2, generator=g), torch.rand(6, 5, 2, 2, generator=g)]
    torch.manual_seed(0)
    heads = nn.ModuleList([nn.Linear(4, 3, bias=False), nn.Linear(5, 3, bias=False)])
    w = DecouplingWeights(lambda_k=0.5, lambda_m=0.2, lambda_s=1.5, target_ratio=0.4, mi_front_weight=3.0,
                          mi_hard_bits=True, distill_weight=0.8, distill_temperature=2.0)
    total, terms = decoupling_loss(logits, labels, gates, outputs, heads, w, gate_logits=z, teacher_logits=teacher)
    mi = [path_class_loss((zl > 0).float(), labels, h) for zl, h in zip(z, heads)]
    expected = (F.cross_entropy(logits, labels) + 0.5 * sum(alignment_loss(o, v) for o, v in zip(outputs, gates))
                + 0.2 * (3.0 * mi[0] + 1.0 * mi[1]) + 1.5 * sum(sparsity_loss(v, 0.4) for v in gates)
                + 0.8 * distillation_loss(logits, teacher, 2.0))
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    assert float(terms["kd"]) == pytest.approx(float(distillation_loss(logits, teacher, 2.0)), rel=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        decoupling_loss(logits, labels, gates, outputs, heads, w, gate_logits=z)
    with pytest.raises(ValueError, match="gate logits"):
        decoupling_loss(logits, labels, gates, outputs, heads, w, teacher_logits=teacher)
