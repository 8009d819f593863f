"""FLOP accounting and filter-skipping inference (detector/acceleration.py).

The counts are checked against arithmetic done by hand on a tiny network;
SparseGatedNet is checked against the dense gated model (logits, gate
logits, paths, and the MACs it really launched) on random inputs and on
real Fashion-MNIST test images, with ACMs randomised so that gates are
mixed on/off (with the authors' initialisation every gate is on and
nothing would be skipped).
"""

from __future__ import annotations

import pytest
import torch

from pathguard.detector.acceleration import (
    SparseGatedNet,
    dense_flops,
    executed_flops,
    flop_summary,
    randomise_controls,
)
from pathguard.detector.models import ARCHITECTURES, SPREAD_EPS, Architecture, ConvNet

torch.set_num_threads(1)

# in 1 x 8 x 8; conv0 1->2 (ungated), pool -> 4x4; conv1 2->3 (gated); conv2 3->4 (gated); head 4->3
TINY = Architecture("tiny", 1, 8, 3, (2, "M", 3, 4), mean=(0.5,), std=(0.5,))

# Hand count, in multiply-accumulates (3x3 kernels: 9 MACs per input channel per output pixel):
CONV0 = 8 * 8 * 2 * 1 * 9  # 64 pixels * 2 out * 1 in * 9 = 1152
CONV1 = 4 * 4 * 3 * 2 * 9  # 16 pixels (after the pool) * 3 out * 2 in * 9 = 864
CONV2 = 4 * 4 * 4 * 3 * 9  # 16 * 4 out * 3 in * 9 = 1728
HEAD = 4 * 3  # 4 features * 3 classes = 12
# ACM of conv1: C_in = 2, hidden = max(2 // 4, 1) = 1: fc1 2*1 + fc2 1*3 = 5
ACM1 = 2 * 1 + 1 * 3
# ACM of conv2: C_in = 3, hidden = max(3 // 4, 1) = 1: fc1 3*1 + fc2 1*4 = 7
ACM2 = 3 * 1 + 1 * 4
BACKBONE = CONV0 + CONV1 + CONV2 + HEAD  # 3756
TOTAL = BACKBONE + ACM1 + ACM2  # 3768


def tiny_model(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return randomise_controls(ConvNet(TINY, gated=True), seed=seed)


def force_gates(model: ConvNet, block: int, bias: list[float]) -> None:
    """Make block's gates input-independent: z = fc2.bias."""
    fc2 = model.blocks[block].control.fc2
    with torch.no_grad():
        fc2.weight.zero_()
        fc2.bias.copy_(torch.tensor(bias))


def assert_sparse_matches(model: ConvNet, images: torch.Tensor) -> torch.Tensor:
    """SparseGatedNet == dense gated model on ``images``; returns the path."""
    model.eval()
    sparse = SparseGatedNet(model)
    with torch.no_grad():
        dense = model.trace(images)
    traces = sparse.trace_batch(images, count=True)
    logits = torch.stack([t.logits for t in traces])
    path = torch.stack([t.path for t in traces])
    assert torch.allclose(logits, dense.logits, atol=1e-4, rtol=1e-4), (logits - dense.logits).abs().max()
    assert torch.equal(path, dense.path)
    for layer, z in enumerate(dense.gate_logits):
        got = torch.stack([t.gate_logits[layer] for t in traces])
        assert torch.allclose(got, z, atol=1e-4, rtol=1e-4)
        # the indices of the filters that ran are exactly the on-gates
        for t, v in zip(traces, dense.gates[layer]):
            assert torch.equal(t.active[layer], v.nonzero().squeeze(1))
    # what the sparse net really launched is what executed_flops predicts
    assert torch.equal(torch.tensor([t.macs for t in traces]), executed_flops(model, images))
    assert torch.allclose(sparse(images), dense.logits, atol=1e-4, rtol=1e-4)
    return dense.path


# ----------------------------------------------------------- FLOP counts


def test_dense_flops_hand_count():
    model = ConvNet(TINY, gated=True)
    flops = dense_flops(model, (1, 8, 8))
    assert flops["layers"] == {"conv0": CONV0, "acm1": ACM1, "conv1": CONV1, "acm2": ACM2, "conv2": CONV2, "head": HEAD}
    assert flops["backbone"] == BACKBONE == 3756
    assert flops["acm"] == ACM1 + ACM2 == 12
    assert flops["total"] == TOTAL == 3768
    # the default input shape is the architecture's, a batch dimension is ignored
    assert dense_flops(model) == flops == dense_flops(model, (5, 1, 8, 8))
    # a plain model has no ACMs and costs the backbone
    plain = dense_flops(ConvNet(TINY, gated=False))
    assert plain["acm"] == 0 and plain["total"] == BACKBONE


def test_dense_flops_odd_size_floors_the_pool():
    model = ConvNet(TINY, gated=True)
    flops = dense_flops(model, (1, 9, 9))
    assert flops["layers"]["conv0"] == 81 * 2 * 1 * 9
    assert flops["layers"]["conv1"] == 16 * 3 * 2 * 9  # max-pool 2x2 floors 9 -> 4
    with pytest.raises(ValueError):
        dense_flops(model, (3, 8, 8))


def test_vgg_small_dense_flops():
    flops = dense_flops(ConvNet(ARCHITECTURES["vgg-small"], gated=True))
    # 28x28: conv 1->32; pool 14x14: 32->64, 64->64; pool 7x7: 64->128, 128->128; head 128->10
    convs = 784 * 32 * 1 * 9 + 196 * (64 * 32 + 64 * 64) * 9 + 49 * (128 * 64 + 128 * 128) * 9
    assert flops["backbone"] == convs + 128 * 10
    # ACMs: 32->8->64, 64->16->64, 64->16->128, 128->32->128
    assert flops["acm"] == (32 * 8 + 8 * 64) + (64 * 16 + 16 * 64) + (64 * 16 + 16 * 128) + (128 * 32 + 32 * 128)


def test_executed_all_on_equals_dense():
    model = ConvNet(TINY, gated=True).eval()  # authors' init: every gate on
    x = torch.rand(5, 1, 8, 8)
    assert executed_flops(model, x).tolist() == [TOTAL] * 5
    per_layer = executed_flops(model, x, per_layer=True)
    assert {k: v.tolist() for k, v in per_layer.items()} == {
        k: [v] * 5 for k, v in dense_flops(model)["layers"].items()
    }
    # a plain model executes exactly its dense backbone
    assert executed_flops(ConvNet(TINY, gated=False).eval(), x).tolist() == [BACKBONE] * 5


def test_executed_layer_all_off_saves_own_and_next_conv():
    model = ConvNet(TINY, gated=True).eval()
    force_gates(model, 1, [-1.0, -1.0, -1.0])  # every filter of conv1 off
    x = torch.rand(4, 1, 8, 8)
    # conv1 saves all 864 of its own MACs, and conv2 reads 0 of its 3 input
    # channels: 16 * 4 * 0 * 9 = 0, saving all 1728; conv2's gates stay on,
    # so the head still costs 12 and both ACMs run (5 + 7).
    expected = TOTAL - CONV1 - CONV2
    assert expected == 1152 + 5 + 7 + 12 == 1176
    assert executed_flops(model, x).tolist() == [expected] * 4
    per_layer = executed_flops(model, x, per_layer=True)
    assert per_layer["conv1"].tolist() == [0] * 4 and per_layer["conv2"].tolist() == [0] * 4
    assert per_layer["acm1"].tolist() == [ACM1] * 4 and per_layer["acm2"].tolist() == [ACM2] * 4
    assert_sparse_matches(model, x)  # conv2 on a zero input: relu(folded bias)


def test_executed_partial_gates():
    model = ConvNet(TINY, gated=True).eval()
    force_gates(model, 1, [1.0, -1.0, 1.0])  # conv1: 2 of 3 on
    force_gates(model, 2, [1.0, -1.0, -1.0, 1.0])  # conv2: 2 of 4 on
    x = torch.rand(3, 1, 8, 8)
    conv1 = 16 * 2 * 2 * 9  # 2 active out, 2 in = 576 (saves 288)
    conv2 = 16 * 2 * 2 * 9  # 2 active out, 2 active in = 576 (saves 1152)
    head = 2 * 3  # 2 active features = 6 (saves 6)
    expected = CONV0 + ACM1 + conv1 + ACM2 + conv2 + head
    assert expected == TOTAL - 288 - 1152 - 6 == 2322
    assert executed_flops(model, x).tolist() == [expected] * 3
    summary = flop_summary(model, x)
    assert summary["executed_mean"] == expected
    assert summary["ratio_vs_plain"] == pytest.approx(expected / BACKBONE)
    assert summary["ratio_vs_dense_gated"] == pytest.approx(expected / TOTAL)
    assert_sparse_matches(model, x)


def test_last_layer_all_off_leaves_head_bias():
    model = ConvNet(TINY, gated=True).eval()
    force_gates(model, 2, [-1.0] * 4)
    x = torch.rand(3, 1, 8, 8)
    assert executed_flops(model, x).tolist() == [TOTAL - CONV2 - HEAD] * 3
    assert_sparse_matches(model, x)
    logits = SparseGatedNet(model)(x)
    assert torch.allclose(logits, model.head.bias.detach().expand(3, -1))


# ------------------------------------------------------ sparse inference


def test_sparse_matches_dense_tiny_random_gates():
    model = tiny_model(1)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = assert_sparse_matches(model, x)
    assert 0.1 < float(path.mean()) < 0.9


@pytest.fixture(scope="module")
def vgg_small():
    torch.manual_seed(3)
    model = randomise_controls(ConvNet(ARCHITECTURES["vgg-small"], gated=True), seed=3)
    return model.eval()


def check_mixed(path: torch.Tensor, model: ConvNet) -> None:
    off = 1.0 - float(path.mean())
    assert 0.25 < off < 0.75, off  # a good fraction of the gates is off
    widths = model.gated_widths
    layers = torch.split(path, widths, dim=1)
    for layer in layers:
        assert 0.1 < float(layer.mean()) < 0.9  # every layer skips something
    # gates depend on the input: not every image has the same path
    assert not (path == path[0]).all()


def test_sparse_matches_dense_vgg_small_random_inputs(vgg_small):
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    path = assert_sparse_matches(vgg_small, x)
    check_mixed(path, vgg_small)


def test_sparse_matches_dense_vgg_small_fashion_mnist(vgg_small, fmnist_test):
    images = fmnist_test.images[:48]
    path = assert_sparse_matches(vgg_small, images)
    check_mixed(path, vgg_small)
    summary = flop_summary(vgg_small, images)
    # about half of the filters on each side of a convolution: ~1/4 of the MACs
    assert summary["ratio_vs_plain"] < 0.6
    assert summary["executed_max"] < summary["dense_backbone"]


def test_sparse_on_plain_model_matches(fmnist_test):
    torch.manual_seed(4)
    plain = randomise_controls(ConvNet(ARCHITECTURES["vgg-small"], gated=False), seed=4)
    images = fmnist_test.images[:8]
    sparse = SparseGatedNet(plain)
    with torch.no_grad():
        assert torch.allclose(sparse(images), plain(images), atol=1e-4, rtol=1e-4)
    assert sparse.trace_one(images[0]).path.numel() == 0


def test_sparse_is_a_snapshot_and_moves_dtype():
    model = tiny_model(2)
    x = torch.rand(4, 1, 8, 8)
    sparse = SparseGatedNet(model)
    with torch.no_grad():
        before = model(x)
        model.blocks[0].conv.weight.add_(1.0)  # later edits of the model are not seen
    assert torch.allclose(sparse(x), before, atol=1e-5)
    sparse64 = SparseGatedNet(tiny_model(2)).double()
    out = sparse64(x.double())
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), before, atol=1e-4)


def test_sparse_rejects_batches():
    sparse = SparseGatedNet(tiny_model())
    with pytest.raises(ValueError):
        sparse.trace_one(torch.rand(2, 1, 8, 8))


def test_all_off_layer_before_a_pool():
    # conv0 1->2 at 8x8; conv1 2->3 (gated) at 8x8 then pool -> 4x4; conv2 3->4 (gated); head 4->3
    arch = Architecture("tiny-pool", 1, 8, 3, (2, 3, "M", 4), mean=(0.5,), std=(0.5,))
    model = ConvNet(arch, gated=True).eval()
    force_gates(model, 1, [-1.0, -1.0, -1.0])
    x = torch.rand(3, 1, 8, 8)
    conv0 = 64 * 2 * 1 * 9  # 1152
    acm = (2 * 1 + 1 * 3) + (3 * 1 + 1 * 4)  # 5 + 7
    # conv1 (64 * 3 * 2 * 9 = 3456) and conv2 (16 * 4 * 3 * 9 = 1728) are skipped entirely
    assert dense_flops(model)["total"] == conv0 + 3456 + 1728 + 12 + acm
    assert executed_flops(model, x).tolist() == [conv0 + acm + 12] * 3
    assert_sparse_matches(model, x)


# ------------------------------------------------ observing image by image

def assert_observes_like_dense(model: ConvNet, images: torch.Tensor) -> None:
    """SparseGatedNet.observe gives what paths.observe gives, field by field."""
    from pathguard.detector.paths import observe

    dense = observe(model.eval(), images, blocks=True)
    sparse = SparseGatedNet(model).observe(images, blocks=True)
    assert sparse.widths == dense.widths and len(sparse) == len(images)
    assert torch.equal(sparse.paths, dense.paths)
    for name in ("logits", "gate_logits", "features"):
        got, want = getattr(sparse, name), getattr(dense, name)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4), name
    assert len(sparse.blocks) == len(dense.blocks) == len(model.blocks)
    for got, want in zip(sparse.blocks, dense.blocks):  # every block's spatial means, full width
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert len(sparse.spreads) == len(dense.spreads) == len(model.blocks)
    for got, want in zip(sparse.spreads, dense.spreads):  # and spreads over space
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    # switched-off filters are exact zeros, as in the dense model's gated output: mean 0, spread sqrt(eps)
    gated = [i for i, block in enumerate(model.blocks) if block.control is not None]
    for layer, index in enumerate(gated):
        off = sparse.paths[:, sum(sparse.widths[:layer]):sum(sparse.widths[:layer + 1])] == 0
        assert (sparse.blocks[index][off] == 0).all()
        assert torch.allclose(sparse.spreads[index][off], torch.tensor(SPREAD_EPS ** 0.5))
    assert SparseGatedNet(model).observe(images).blocks == []  # only when asked for
    assert SparseGatedNet(model).observe(images).spreads == []


def test_sparse_observe_matches_dense_observe_on_real_images(vgg_small, fmnist_test):
    assert_observes_like_dense(vgg_small, fmnist_test.images[:24])


def test_sparse_observe_with_a_layer_all_off():
    arch = Architecture("tiny-pool", 1, 8, 3, (2, 3, "M", 4), mean=(0.5,), std=(0.5,))
    model = ConvNet(arch, gated=True).eval()
    force_gates(model, 1, [-1.0, -1.0, -1.0])  # block 1 computes nothing; block 2 sees a zero input
    assert_observes_like_dense(model, torch.rand(3, 1, 8, 8))
    assert_observes_like_dense(tiny_model(3), torch.rand(5, 1, 8, 8))


def test_sparse_observe_of_a_plain_model_has_an_empty_path(fmnist_test):
    plain = randomise_controls(ConvNet(ARCHITECTURES["vgg-small"], gated=False), seed=4)
    batch = SparseGatedNet(plain).observe(fmnist_test.images[:3])
    assert batch.paths.shape == (3, 0) and batch.gate_logits.shape == (3, 0) and batch.widths == []
    with pytest.raises(ValueError):
        SparseGatedNet(plain).observe(torch.zeros(0, 1, 28, 28))


# ------------------------------------------------- the compiled per-image core

def assert_compiled_equals_eager(model: ConvNet, images: torch.Tensor) -> None:
    """The TorchScript-compiled core and the same function run as plain
    Python give bit for bit the same answer, field by field."""
    compiled, eager = SparseGatedNet(model), SparseGatedNet(model, compiled=False)
    for blocks in (False, True):
        got, want = compiled.observe(images, blocks=blocks), eager.observe(images, blocks=blocks)
        for name in ("logits", "paths", "gate_logits", "features"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
        assert len(got.blocks) == len(want.blocks) == (len(model.blocks) if blocks else 0)
        for a, b in zip(got.blocks + got.spreads, want.blocks + want.spreads):
            assert torch.equal(a, b)
    for x in images[:4]:
        a, b = compiled.trace_one(x, count=True, blocks=True), eager.trace_one(x, count=True, blocks=True)
        assert a.macs == b.macs > 0
        assert all(torch.equal(u, v) for u, v in zip(a.active, b.active))
    # the compiled path really ran: a broken TorchScript would otherwise fall back unnoticed
    assert compiled.scripted is True and eager.scripted is False


def test_compiled_core_equals_plain_python_on_real_images(vgg_small, fmnist_test):
    images = torch.cat([fmnist_test.images[:16], torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28)])
    assert_compiled_equals_eager(vgg_small, images)


def test_compiled_core_equals_plain_python_with_a_layer_all_off():
    arch = Architecture("tiny-pool", 1, 8, 3, (2, 3, "M", 4), mean=(0.5,), std=(0.5,))
    model = ConvNet(arch, gated=True).eval()
    force_gates(model, 1, [-1.0, -1.0, -1.0])  # an empty map, then a zero input
    assert_compiled_equals_eager(model, torch.rand(3, 1, 8, 8))
    plain = randomise_controls(ConvNet(TINY, gated=False), seed=5)
    assert_compiled_equals_eager(plain, torch.rand(3, 1, 8, 8))


def test_compiled_core_in_double_precision():
    model = tiny_model(2).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    batch = SparseGatedNet(model).observe(x, blocks=True)
    assert batch.logits.dtype == batch.paths.dtype == batch.blocks[0].dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(batch.logits, model(x), atol=1e-10)


def test_observe_reads_only_the_named_blocks_and_changes_no_bit(vgg_small, fmnist_test):
    images = fmnist_test.images[:12]
    sparse = SparseGatedNet(vgg_small)
    full = sparse.observe(images, blocks=True)
    for named in ({0}, {1, len(vgg_small.blocks) - 1}, set()):
        part = sparse.observe(images, blocks=named)
        for name in ("logits", "paths", "gate_logits", "features"):
            assert torch.equal(getattr(part, name), getattr(full, name)), name
        assert len(part.blocks) == len(part.spreads) == len(vgg_small.blocks)  # one entry per block
        for i in range(len(vgg_small.blocks)):
            if i in named:
                assert torch.equal(part.blocks[i], full.blocks[i]) and torch.equal(part.spreads[i], full.spreads[i])
            else:  # a placeholder that no fitted statistic can be applied to
                assert part.blocks[i].shape == part.spreads[i].shape == (len(images), 0)
    with pytest.raises(ValueError, match="blocks"):
        sparse.observe(images, blocks={len(vgg_small.blocks)})
