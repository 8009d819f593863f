"""`pathguard train`: two-stage training (docs/method.md, "Training
objective"): plain net, then decoupled fine-tuning.

Stage 1 trains the plain network.  Stage 2 copies it into the decoupled
network and fine-tunes with CE + KL alignment + path-class CE + sparsity.
To compare at the same budget, the plain network keeps training for as many
epochs as stage 2 (CE only, same schedule): that is the reference plain net.
The validation split (carved from training data with a fixed seed) picks
the best epoch; the test split is only measured at the end, for the card.
Ctrl-C stops training and writes the bundle from the best checkpoint so far.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pathguard.detector.artifacts import atomic_save_tensors, load_tensors
from pathguard.detector.bundle import DEFAULT_BUNDLE, state_dict_copy, write_bundle
from pathguard.detector.data import (
    DATASETS, RESIZE_RULES, DataSpec, ImageSet, load_split, normalisation_stats, resolve_spec, train_val_split,
)
from pathguard.detector.devices import DEVICES, exact_arithmetic, resolve_device
from pathguard.detector.losses import DecouplingWeights, decoupling_loss
from pathguard.detector.measure import evaluate_accuracy, measure_card, path_class_term, versions
from pathguard.detector.models import ARCHITECTURES, ConvNet, architecture_for
from pathguard.detector.paths import device_of

from .config import check, option

PRECISIONS = ("fp32", "bf16")


@dataclass
class Config:
    """Training options; the defaults are the shipped bundle's recipe
    (bundles/fmnist-default/training.json), so `pathguard train` with no
    flags reproduces its configuration."""

    dataset: str = option("fashion-mnist", "dataset name", choices=DATASETS)
    data_root: str | None = option(None, "dataset directory (default: the dataset's own); for folder: "
                                   "root/train/<class>/ and root/test/<class>/, or root/<class>/", kind=str)
    image_size: int | None = option(None, "bring images to this square size (default: their own size)",
                                    kind=int, minimum=1)
    channels: int | None = option(None, "1 = grey, 3 = RGB (default: the data's own; a folder with any colour "
                                  "image is RGB)", kind=int, choices=(1, 3))
    resize: str = option("pad", "how an image of another size is brought to --image-size: pad (keep the aspect "
                         "ratio, pad with the border colour), crop (centre crop), stretch, or none (refuse)",
                         choices=RESIZE_RULES)
    test_fraction: float = option(0.2, "folder with one sub-folder per class: share of each class held out "
                                  "as the test split", minimum=0)
    architecture: str = option("vgg7", "backbone", choices=tuple(ARCHITECTURES))
    output: str = option("runs/fmnist-default", "bundle directory to write (never the shipped bundle by default)")
    force: bool = option(False, "replace an existing bundle at --output")
    epochs_plain: int = option(10, "stage 1: epochs of the plain network", minimum=0)
    epochs_decoupled: int = option(15, "stage 2: epochs of decoupled fine-tuning (and of the plain reference)",
                                   minimum=1)
    batch_size: int = option(128, "training batch size", minimum=1)
    lr_plain: float = option(0.05, "stage-1 learning rate (cosine schedule)", minimum=0)
    lr_decoupled: float = option(0.01, "stage-2 backbone learning rate (cosine schedule)", minimum=0)
    # The ACMs and path heads start from scratch while the backbone is
    # already trained: they learn at lr_decoupled * control_lr_scale.
    control_lr_scale: float = option(10.0, "learning-rate factor of the ACMs and path heads", minimum=0)
    momentum: float = option(0.9, "SGD (Nesterov) momentum", minimum=0)
    weight_decay: float = option(5e-4, "SGD weight decay", minimum=0)
    val_fraction: float = option(0.1, "share of the training split held out for validation", minimum=0)
    seed: int = option(0, "seed of the split, the initialisation and the batches")
    lambda_k: float = option(1.0, "weight of the alignment (KL) term", minimum=0)
    lambda_m: float = option(0.5, "weight of the path-class (mutual-information surrogate) term", minimum=0)
    lambda_s: float = option(1.0, "weight of the sparsity term", minimum=0)
    mi_front_weight: float = option(1.0, "weight of the first gated layer's path-class term relative to the last "
                                    "(linear in between)", minimum=0)
    mi_hard_bits: bool = option(False, "path-class heads read the binary path (straight-through) instead of the "
                                "training gate")
    # Distillation from the stage-1 plain network: its soft answers keep the
    # decoupled net close to what the plain net computes while gates switch off.
    distill_weight: float = option(1.0, "weight of the distillation term from the stage-1 plain net (0: none)",
                                   minimum=0)
    distill_temperature: float = option(4.0, "distillation temperature", minimum=0)
    target_ratio: float = option(0.45, "target fraction of active gates (rho)", minimum=0)
    # Std of the Gaussian noise on the gate logits in training.  "linear"
    # anneals it to 0 over stage 2, so the last steps train the backbone
    # under the deterministic gates it will run with at inference.
    # "linear-hard" also raises the share of hard (straight-through) gate
    # values from 0.5 to 1, so the last epoch sees exactly binary gates.
    gate_noise: float = option(1.0, "std of the gate-logit noise in training", minimum=0)
    noise_schedule: str = option("linear", "gate-noise schedule over stage 2",
                                 choices=("constant", "linear", "linear-hard"))
    # An epoch only counts as "best" if its validation active ratio is at
    # most this, so the kept checkpoint meets the sparsity goal.
    max_active_ratio: float = option(0.5, "most active-gate ratio a kept checkpoint may have", minimum=0)
    augment: bool = option(True, "random flips and 2-pixel shifts")
    # Start stage 2 from a saved plain checkpoint instead of running stage 1
    # (for tuning the decoupling terms without retraining the plain net).
    init_plain: str | None = option(None, "start stage 2 from this plain checkpoint (safetensors)", kind=str)
    limit_train: int | None = option(None, "use only the first N training images (smoke tests)", kind=int,
                                     minimum=1)
    limit_test: int | None = option(None, "measure on the first N test images only", kind=int, minimum=1)
    threads: int | None = option(None, "torch threads (default: torch's choice)", kind=int, minimum=1)
    device: str = option("auto", "where to train: auto (the GPU if PyTorch sees one), cpu or cuda",
                         choices=DEVICES)
    # bf16 autocast runs a training step 1.7-1.9x faster on a CPU with AMX or
    # AVX512-BF16 (bench/bench_train.py); like TF32 on a GPU, it is one more
    # source of noise in SGD.  Everything measured stays float32.
    precision: str = option("fp32", "arithmetic of the training passes: fp32, or bf16 (autocast: convolutions "
                            "and products in bfloat16; weights, optimiser, losses, validation and the card in "
                            "float32)", choices=PRECISIONS)
    progress: bool = option(True, "progress bars")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels."""
    n = x.shape[0]
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _optimizer(params, lr: float, cfg: Config) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _cosine(optimizer, epochs: int, steps_per_epoch: int):
    total = max(epochs * steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context of a training pass: bfloat16 autocast for ``bf16``
    (convolutions and linear layers in bfloat16, reductions and the rest
    in float32), nothing for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run in hardware here (AVX512-BF16 or
    AMX on a CPU, a GPU that supports it); elsewhere they are emulated and
    slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if not torch.backends.mkldnn.is_available():
        return False
    try:  # oneDNN's own check (a private op: a torch without it is taken as "no")
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def decoupling_weights(cfg: Config) -> DecouplingWeights:
    """The weights of stage 2's objective, as ``cfg`` sets them."""
    return DecouplingWeights(cfg.lambda_k, cfg.lambda_m, cfg.lambda_s, cfg.target_ratio, cfg.mi_front_weight,
                             cfg.mi_hard_bits, cfg.distill_weight, cfg.distill_temperature)


class _Stage:
    """One training stage: a model, its optimizer, its best checkpoint."""

    def __init__(self, name: str, model: ConvNet, lr: float, epochs: int, steps: int, cfg: Config,
                 heads: nn.ModuleList | None = None) -> None:
        self.name, self.model, self.heads, self.epochs = name, model, heads, epochs
        control = [p for n, p in model.named_parameters() if ".control." in n]
        if heads is not None:
            control += list(heads.parameters())
        backbone = [p for n, p in model.named_parameters() if ".control." not in n]
        groups = [{"params": backbone, "lr": lr}]
        if control:
            groups.append({"params": control, "lr": lr * cfg.control_lr_scale})
        self.optimizer = _optimizer(groups, lr, cfg)
        self.scheduler = _cosine(self.optimizer, epochs, steps)
        self.best_state = state_dict_copy(model)
        self.best_score = -1.0
        self.best_epoch = 0
        self.history: list[dict] = []
        self.checkpoint: Path | None = None
        self.teacher: ConvNet | None = None  # distillation source (stage 2 only)
        self.precision = cfg.precision


def _train_step(stage: _Stage, x: torch.Tensor, y: torch.Tensor, weights: DecouplingWeights | None) -> tuple:
    """One optimisation step; returns (logits, terms as detached tensors).
    The forward passes run under ``stage.precision``'s autocast; the losses
    are computed outside it, in float32 (the layer outputs are only averaged
    over space, in float32, by the alignment term: no full-size copies)."""
    autocast = training_autocast(stage.precision, x.device)
    if weights is None:
        with autocast:
            logits = stage.model(x)
        logits = logits.float()
        loss = F.cross_entropy(logits, y)
        terms = {"ce": loss.detach()}
    else:
        teacher = None
        with autocast:
            trace = stage.model.trace(x, keep_outputs=True)
            if stage.teacher is not None:
                with torch.no_grad():
                    teacher = stage.teacher(x)
        logits = trace.logits.float()
        gates = [g.float() for g in trace.gates]
        loss, terms = decoupling_loss(logits, y, gates, trace.outputs, stage.heads, weights,
                                      gate_logits=[z.float() for z in trace.gate_logits],
                                      teacher_logits=None if teacher is None else teacher.float())
        terms["on"] = torch.cat(gates, dim=1).detach().mean()
    stage.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    stage.optimizer.step()
    stage.scheduler.step()
    return logits, terms


def _run_epoch(stage: _Stage, epoch: int, train: ImageSet, cfg: Config, generator: torch.Generator,
               weights: DecouplingWeights | None) -> dict:
    """One pass over the training part; the running sums stay on the
    device (no per-step sync), read once at the end."""
    steps = math.ceil(len(train) / cfg.batch_size)
    sums: dict[str, torch.Tensor] = {}
    seen, correct = 0, torch.zeros((), device=train.images.device)
    bar = tqdm(_batches(len(train), cfg.batch_size, generator), total=steps, disable=not cfg.progress,
               desc=f"{stage.name} {epoch}/{stage.epochs}", leave=False)
    for step, index in enumerate(bar):
        index = index.to(train.images.device)
        x, y = train.images[index], train.labels[index]
        if cfg.augment:
            x = augment_batch(x, generator)
        logits, terms = _train_step(stage, x, y, weights)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
        seen += len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        if cfg.progress and step % 50 == 0:
            bar.set_postfix({k: f"{float(v) / seen:.3f}" for k, v in sums.items() if not k.startswith("mi_")})
    return {"train_accuracy": float(correct) / seen, **{f"train_{k}": float(v) / seen for k, v in sums.items()}}


def _run_stage(stage: _Stage, train: ImageSet, val: ImageSet, cfg: Config, generator: torch.Generator,
               weights: DecouplingWeights | None) -> None:
    for epoch in range(1, stage.epochs + 1):
        stage.model.train()
        remaining = (stage.epochs - epoch) / max(stage.epochs - 1, 1)  # 1 -> 0 over the stage
        annealed = cfg.noise_schedule in ("linear", "linear-hard")
        stage.model.gate_noise = cfg.gate_noise * (remaining if annealed else 1.0)
        stage.model.gate_hard_prob = 1.0 - 0.5 * remaining if cfg.noise_schedule == "linear-hard" else 0.5
        started = time.time()
        trained = _run_epoch(stage, epoch, train, cfg, generator, weights)
        val_metrics = evaluate_accuracy(stage.model, val)
        record = {"epoch": epoch, "seconds": time.time() - started, **trained,
                  **{f"val_{k}": v for k, v in val_metrics.items()}}
        stage.history.append(record)
        eligible = val_metrics.get("active_ratio", 0.0) <= cfg.max_active_ratio
        # Sparse-enough epochs always beat too-dense ones; then accuracy decides.
        score = val_metrics["accuracy"] + (1.0 if eligible else 0.0)
        if score > stage.best_score:
            stage.best_score, stage.best_epoch = score, epoch
            stage.best_state = state_dict_copy(stage.model)
            if stage.checkpoint is not None:
                atomic_save_tensors(stage.checkpoint, stage.best_state, {"epoch": str(epoch)})
        tqdm.write(f"[{stage.name}] epoch {epoch}: " + ", ".join(
            f"{k}={v:.4f}" for k, v in record.items() if k != "epoch"))


def check_output(cfg: Config) -> None:
    """Never replace a bundle without --force, and never the shipped one
    by accident."""
    out = Path(cfg.output)
    if out.exists() and not cfg.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it, or choose another --output")
    if out.resolve() == DEFAULT_BUNDLE.resolve() and not cfg.force:
        raise FileExistsError(f"{out} is the shipped bundle: pass --force to replace it")


@dataclass
class _Data:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: tuple
    record: dict  # data.json of the bundle


def _load_data(cfg: Config) -> _Data:
    # An absolute root: later commands may run from another directory.
    root = None if cfg.data_root is None else str(Path(cfg.data_root).resolve())
    spec = resolve_spec(DataSpec(cfg.dataset, root, cfg.image_size, cfg.channels, cfg.resize,
                                 cfg.test_fraction, cfg.seed))
    full_train, test = load_split(spec, "train"), load_split(spec, "test")
    for note in dict.fromkeys(full_train.notes + test.notes):
        print(f"note: {note}")
    if cfg.limit_train:
        full_train = full_train.head(cfg.limit_train)
    if cfg.limit_test:
        test = test.head(cfg.limit_test)
    c, h, w = full_train.shape
    if h != w:
        raise ValueError(f"the images are {h}x{w}: pass --image-size to bring them to a square size")
    train_idx, val_idx = train_val_split(len(full_train), cfg.val_fraction, cfg.seed)
    train = full_train.subset(train_idx)
    mean, std = normalisation_stats(train)
    record = {"spec": spec.to_json(), "notes": list(dict.fromkeys(full_train.notes + test.notes)),
              "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed, "limit_train": cfg.limit_train,
                        "train": len(train), "validation": len(val_idx), "test": len(test)},
              "normalisation": {"mean": list(mean), "std": list(std), "computed_on": "the train part"}}
    return _Data(train, full_train.subset(val_idx), test, full_train.classes, record)


def _stage2(cfg: Config, arch, plain: ConvNet, steps: int) -> tuple[_Stage, _Stage]:
    """The decoupled stage and the plain reference, both from the plain net."""
    device = device_of(plain)
    decoupled = ConvNet(arch, gated=True).to(device)
    decoupled.load_plain_weights(plain)
    heads = nn.ModuleList(nn.Linear(wd, arch.num_classes, bias=False) for wd in decoupled.gated_widths).to(device)
    # The reference: the same plain net given the same extra budget.
    stage_ref = _Stage("plain-ref", plain, cfg.lr_decoupled, cfg.epochs_decoupled, steps, cfg)
    stage_ref.checkpoint = checkpoint_dir(cfg) / "plain_reference.safetensors"
    stage2 = _Stage("decoupled", decoupled, cfg.lr_decoupled, cfg.epochs_decoupled, steps, cfg, heads)
    stage2.checkpoint = checkpoint_dir(cfg) / "decoupled.safetensors"
    if cfg.distill_weight > 0:
        # A frozen copy of the stage-1 net: the reference keeps training the original.
        stage2.teacher = ConvNet(arch, gated=False).to(device)
        stage2.teacher.load_state_dict(plain.state_dict())
        stage2.teacher.eval().requires_grad_(False)
    return stage2, stage_ref


def train(cfg: Config) -> Path:
    """Run both stages and write the bundle; returns the bundle path."""
    check(cfg)
    check_output(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, exact=False)  # TF32 while training; exact from measuring on
    if cfg.precision == "bf16" and not bf16_is_native(device):
        print(f"note: this {device.type} has no native bfloat16 arithmetic: --precision bf16 will be slower "
              "than fp32 here")
    seed_everything(cfg.seed)
    started = time.time()
    data = _load_data(cfg)
    # The whole training part lives on the device: batches are index lookups, no copies.
    data.train = data.train.to(device)
    c, h, _ = data.train.shape
    norm = data.record["normalisation"]
    arch = architecture_for(cfg.architecture, c, h, len(data.classes), norm["mean"], norm["std"])
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    weights = decoupling_weights(cfg)

    plain = ConvNet(arch, gated=False).to(device)
    stage1 = _Stage("plain", plain, cfg.lr_plain, cfg.epochs_plain, steps, cfg)
    stage1.checkpoint = checkpoint_dir(cfg) / "plain.safetensors"
    stage2 = stage_ref = None
    interrupted = None
    try:
        if cfg.init_plain:
            stage1.best_state = load_tensors(cfg.init_plain)
        else:
            _run_stage(stage1, data.train, data.val, cfg, generator, None)
        plain.load_state_dict(stage1.best_state)
        # Stage 2 starts from a fixed RNG state, so it is the same whether
        # stage 1 ran just before or its checkpoint was passed as init_plain.
        seed_everything(cfg.seed + 1)
        generator.manual_seed(cfg.seed + 1)
        stage2, stage_ref = _stage2(cfg, arch, plain, steps)
        _run_stage(stage2, data.train, data.val, cfg, generator, weights)
        _run_stage(stage_ref, data.train, data.val, cfg, generator, None)
    except KeyboardInterrupt:
        interrupted = "interrupted by the user; bundle written from the best checkpoint so far"
        tqdm.write(interrupted)
        if stage2 is None:
            raise SystemExit(
                f"interrupted before the decoupled stage began: no bundle written; the best plain "
                f"checkpoint so far is in {stage1.checkpoint}") from None
    return _write(cfg, arch, data, (stage1, stage2, stage_ref), interrupted, time.time() - started)


def _write(cfg: Config, arch, data: _Data, stages: tuple, interrupted: str | None, seconds: float,
           extra: dict | None = None) -> Path:
    """The best checkpoints, measured side by side, written as a bundle;
    ``extra`` goes into training.json as it is (where the run happened)."""
    stage1, stage2, stage_ref = stages
    exact_arithmetic(True)
    decoupled, plain = stage2.model, stage_ref.model
    decoupled.load_state_dict(stage2.best_state)
    plain.load_state_dict(stage_ref.best_state)
    decoupled.eval()
    plain.eval()
    card = measure_card(decoupled, plain, data.test, data.val, train=data.train)
    card["path_class_term_end"] = path_class_term(stage2.history, arch.num_classes)
    card["interrupted"] = interrupted
    decoupled.cpu()
    plain.cpu()
    training = {
        "config": asdict(cfg),
        "best_epoch": {"plain": stage1.best_epoch, "decoupled": stage2.best_epoch,
                       "plain_reference": stage_ref.best_epoch},
        "history": {"plain": stage1.history, "decoupled": stage2.history, "plain_reference": stage_ref.history},
        "split": {"train": len(data.train), "validation": len(data.val), "test": len(data.test), "seed": cfg.seed},
        "wall_seconds": seconds,
        "versions": versions(),
        **(extra or {}),
    }
    return write_bundle(cfg.output, arch, data.classes, decoupled, plain, training, card, data.record)


def run(cfg: Config) -> Path:
    path = train(cfg)
    print(f"bundle written to {path}")
    return path


def checkpoint_dir(cfg: Config) -> Path:
    """Best-so-far checkpoints live beside the bundle, so Ctrl-C loses nothing."""
    out = Path(cfg.output)
    return out.parent / f".{out.name}.checkpoints"


