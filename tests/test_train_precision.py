"""`pathguard train --precision bf16`: the training passes run in bfloat16
(autocast), everything kept and measured stays float32."""

from __future__ import annotations

import pytest
import torch

from pathguard.detector.artifacts import read_json
from pathguard.detector.bundle import load_bundle
from pathguard.detector.losses import alignment_loss
from pathguard.detector.models import ConvNet, architecture_for
from pathguard.jobs.train import Config, _stage2, _Stage, _train_step, decoupling_weights, train, training_autocast


def _stages(precision: str):
    torch.manual_seed(0)
    arch = architecture_for("vgg-small", 1, 28, 10, [0.3], [0.35])
    cfg = Config(precision=precision, architecture="vgg-small")
    plain = ConvNet(arch, gated=False)
    decoupled, _ = _stage2(cfg, arch, ConvNet(arch, gated=False), steps=10)
    plain_stage = _Stage("plain", plain, cfg.lr_plain, 1, 10, cfg)
    weights = decoupling_weights(cfg)
    for stage in (plain_stage, decoupled):
        stage.model.train()
    return {"plain": (plain_stage, None), "decoupled": (decoupled, weights)}


@pytest.mark.parametrize("precision, conv_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_training_step_runs_in_the_asked_precision(precision, conv_dtype):
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    for kind, (stage, weights) in _stages(precision).items():
        seen = []
        hook = stage.model.blocks[1].conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        before = [p.detach().clone() for p in stage.model.parameters()]
        logits, terms = _train_step(stage, x, y, weights)
        hook.remove()
        assert seen == [conv_dtype], kind
        # what is kept stays float32, the losses are float32 and finite, and the step moved the weights
        assert all(p.dtype == torch.float32 for p in stage.model.parameters()), kind
        assert logits.dtype == torch.float32 and all(torch.isfinite(v) and v.dtype == torch.float32
                                                     for v in terms.values()), kind
        assert any(not torch.equal(b, p) for b, p in zip(before, stage.model.parameters())), kind
        if stage.teacher is not None:
            assert all(p.dtype == torch.float32 for p in stage.teacher.parameters())


def test_autocast_refuses_an_unknown_precision():
    with pytest.raises(ValueError, match="fp16"):
        training_autocast("fp16", torch.device("cpu"))


def test_alignment_term_reads_bfloat16_outputs_in_float32():
    """The alignment term averages a bfloat16 output in float32: the same
    value as averaging its float32 copy."""
    g = torch.Generator().manual_seed(2)
    out = torch.rand(4, 6, 5, 5, generator=g).to(torch.bfloat16)
    gate = torch.rand(4, 6, generator=g)
    assert torch.allclose(alignment_loss(out, gate), alignment_loss(out.float(), gate), rtol=1e-6, atol=1e-7)
    assert alignment_loss(out, gate).dtype == torch.float32


def test_bf16_training_writes_a_float32_bundle(tmp_path, fmnist_test):
    cfg = Config(output=str(tmp_path / "bundle"), epochs_plain=1, epochs_decoupled=1, limit_train=600,
                 limit_test=200, progress=False, architecture="vgg-small", device="cpu", precision="bf16")
    threads = torch.get_num_threads()
    path = train(cfg)
    torch.set_num_threads(threads)
    bundle = load_bundle(path)
    for model in (bundle.decoupled, bundle.plain):
        assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())
    training = read_json(path / "training.json")
    assert training["config"]["precision"] == "bf16"
    # one short epoch per stage on 540 images learns something (chance: 0.10), as in fp32 (test_train_smoke)
    test = bundle.card["test"]
    assert test["decoupled_accuracy"] > 0.15 and test["plain_accuracy"] > 0.15
    images = fmnist_test.images[:64]
    with torch.no_grad():
        assert bundle.decoupled(images).dtype == torch.float32
