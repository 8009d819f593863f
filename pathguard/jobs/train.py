"""Two-stage training (design.md §1): plain net, then decoupled fine-tuning.

Stage 1 trains the plain network.  Stage 2 copies it into the decoupled
network and fine-tunes with CE + KL alignment + path-class CE + sparsity.
To compare at the same budget, the plain network keeps training for as many
epochs as stage 2 (CE only, same schedule): that is the reference plain net.
The validation split (carved from training data with a fixed seed) picks
the best epoch; the test split is only measured at the end, for the card.
Ctrl-C stops training and writes the bundle from the best checkpoint so far.
"""

from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .artifacts import atomic_save_tensors, load_tensors
from .bundle import state_dict_copy, write_bundle
from .data import ImageSet, load_dataset, train_val_split
from .losses import DecouplingWeights, decoupling_loss
from .models import ConvNet, architecture_for
from .paths import path_summary


@dataclass
class TrainConfig:
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    architecture: str = "vgg-small"
    output: str = "bundles/fmnist-default"
    epochs_plain: int = 8
    epochs_decoupled: int = 6
    batch_size: int = 128
    lr_plain: float = 0.05
    lr_decoupled: float = 0.01
    # The ACMs and path heads start from scratch while the backbone is
    # already trained: they learn at lr_decoupled * control_lr_scale.
    control_lr_scale: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    seed: int = 0
    lambda_k: float = 1.0
    lambda_m: float = 0.04
    lambda_s: float = 1.0
    target_ratio: float = 0.5
    # Std of the Gaussian noise on the gate logits in training (design: 1.0).
    # "linear" anneals it to 0 over stage 2, so the last steps train the
    # backbone under the deterministic gates it will run with at inference.
    # "linear-hard" also raises the share of hard (straight-through) gate
    # values from 0.5 to 1, so the last epoch sees exactly binary gates.
    gate_noise: float = 1.0
    noise_schedule: str = "constant"
    # An epoch only counts as "best" if its validation active ratio is at
    # most this, so the kept checkpoint meets the sparsity goal.
    max_active_ratio: float = 0.6
    augment: bool = True
    # Start stage 2 from a saved plain checkpoint instead of running stage 1
    # (for tuning the decoupling terms without retraining the plain net).
    init_plain: str | None = None
    limit_train: int | None = None  # use only the first N training images (smoke tests)
    limit_test: int | None = None
    threads: int | None = None
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def evaluate_accuracy(model: ConvNet, data: ImageSet, batch_size: int = 1000) -> dict:
    """Accuracy (and, for the gated net, mean active ratio) in inference mode."""
    model.eval()
    correct, active, total = 0, 0.0, 0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size]
        trace = model.trace(x)
        correct += int((trace.logits.argmax(1) == data.labels[start:start + batch_size]).sum())
        if trace.gates:
            active += float(trace.path.float().mean()) * len(x)
        total += len(x)
    out = {"accuracy": correct / total}
    if model.gated:
        out["active_ratio"] = active / total
    return out


def _batches(n: int, batch_size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _optimizer(params, lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _cosine(optimizer, epochs: int, steps_per_epoch: int):
    total = max(epochs * steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


class _Stage:
    """One training stage: a model, its optimizer, its best checkpoint."""

    def __init__(self, name: str, model: ConvNet, lr: float, epochs: int, steps: int, cfg: TrainConfig,
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


def _run_stage(stage: _Stage, train: ImageSet, val: ImageSet, cfg: TrainConfig, generator: torch.Generator,
               weights: DecouplingWeights | None) -> None:
    steps = math.ceil(len(train) / cfg.batch_size)
    for epoch in range(1, stage.epochs + 1):
        stage.model.train()
        remaining = (stage.epochs - epoch) / max(stage.epochs - 1, 1)  # 1 -> 0 over the stage
        annealed = cfg.noise_schedule in ("linear", "linear-hard")
        stage.model.gate_noise = cfg.gate_noise * (remaining if annealed else 1.0)
        stage.model.gate_hard_prob = 1.0 - 0.5 * remaining if cfg.noise_schedule == "linear-hard" else 0.5
        started = time.time()
        sums: dict[str, float] = {}
        seen = correct = 0
        bar = tqdm(_batches(len(train), cfg.batch_size, generator), total=steps, disable=not cfg.progress,
                   desc=f"{stage.name} {epoch}/{stage.epochs}", leave=False)
        for index in bar:
            x, y = train.images[index], train.labels[index]
            if cfg.augment:
                x = augment_batch(x, generator)
            if weights is None:
                logits = stage.model(x)
                loss = F.cross_entropy(logits, y)
                terms = {"ce": loss.item()}
            else:
                trace = stage.model.trace(x, keep_outputs=True)
                logits = trace.logits
                loss, terms = decoupling_loss(logits, y, trace.gates, trace.outputs, stage.heads, weights)
                terms["on"] = float(trace.path.detach().mean())
            stage.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            stage.optimizer.step()
            stage.scheduler.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix({k: f"{v / seen:.3f}" for k, v in sums.items()} | {"acc": f"{correct / seen:.3f}"})
        val_metrics = evaluate_accuracy(stage.model, val)
        record = {"epoch": epoch, "train_accuracy": correct / seen, "seconds": time.time() - started,
                  **{f"train_{k}": v / seen for k, v in sums.items()},
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


def train(cfg: TrainConfig) -> Path:
    """Run both stages and write the bundle; returns the bundle path."""
    if cfg.noise_schedule not in ("constant", "linear", "linear-hard"):
        raise ValueError(f"noise_schedule must be 'constant', 'linear' or 'linear-hard', got {cfg.noise_schedule!r}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    started = time.time()
    full_train = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    if cfg.limit_train:
        full_train = full_train.head(cfg.limit_train)
    if cfg.limit_test:
        test = test.head(cfg.limit_test)
    train_idx, val_idx = train_val_split(len(full_train), cfg.val_fraction, cfg.seed)
    train_set, val_set = full_train.subset(train_idx), full_train.subset(val_idx)
    c, h, w = full_train.shape
    if h != w:
        raise ValueError(f"square images expected, got {h}x{w}")
    arch = architecture_for(cfg.architecture, c, h, len(full_train.classes))
    generator = torch.Generator().manual_seed(cfg.seed)
    steps = math.ceil(len(train_set) / cfg.batch_size)

    plain = ConvNet(arch, gated=False)
    stage1 = _Stage("plain", plain, cfg.lr_plain, cfg.epochs_plain, steps, cfg)
    stage1.checkpoint = checkpoint_dir(cfg) / "plain.safetensors"
    stage2 = stage_ref = None
    interrupted = None
    try:
        if cfg.init_plain:
            stage1.best_state = load_tensors(cfg.init_plain)
        else:
            _run_stage(stage1, train_set, val_set, cfg, generator, None)
        plain.load_state_dict(stage1.best_state)

        # Stage 2 starts from a fixed RNG state, so it is the same whether
        # stage 1 ran just before or its checkpoint was passed as init_plain.
        seed_everything(cfg.seed + 1)
        generator.manual_seed(cfg.seed + 1)
        decoupled = ConvNet(arch, gated=True)
        decoupled.load_plain_weights(plain)
        widths = decoupled.gated_widths
        heads = nn.ModuleList(nn.Linear(wd, arch.num_classes, bias=False) for wd in widths)
        weights = DecouplingWeights(cfg.lambda_k, cfg.lambda_m, cfg.lambda_s, cfg.target_ratio)
        # The reference: the same plain net given the same extra budget.
        stage_ref = _Stage("plain-ref", plain, cfg.lr_decoupled, cfg.epochs_decoupled, steps, cfg)
        stage_ref.checkpoint = checkpoint_dir(cfg) / "plain_reference.safetensors"
        stage2 = _Stage("decoupled", decoupled, cfg.lr_decoupled, cfg.epochs_decoupled, steps, cfg, heads)
        stage2.checkpoint = checkpoint_dir(cfg) / "decoupled.safetensors"
        _run_stage(stage2, train_set, val_set, cfg, generator, weights)
        _run_stage(stage_ref, train_set, val_set, cfg, generator, None)
    except KeyboardInterrupt:
        interrupted = "interrupted by the user; bundle written from the best checkpoint so far"
        tqdm.write(interrupted)
        if stage2 is None:
            raise SystemExit(
                f"interrupted before the decoupled stage began: no bundle written; the best plain "
                f"checkpoint so far is in {stage1.checkpoint}") from None

    decoupled.load_state_dict(stage2.best_state)
    plain.load_state_dict(stage_ref.best_state)
    decoupled.eval()
    plain.eval()

    card = measure_card(decoupled, plain, test, val_set)
    card["interrupted"] = interrupted
    training = {
        "config": asdict(cfg),
        "best_epoch": {"plain": stage1.best_epoch, "decoupled": stage2.best_epoch, "plain_reference": stage_ref.best_epoch},
        "history": {"plain": stage1.history, "decoupled": stage2.history, "plain_reference": stage_ref.history},
        "split": {"train": len(train_set), "validation": len(val_set), "test": len(test), "seed": cfg.seed},
        "wall_seconds": time.time() - started,
        "versions": versions(),
    }
    return write_bundle(cfg.output, arch, full_train.classes, decoupled, plain, training, card)


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """Best-so-far checkpoints live beside the bundle, so Ctrl-C loses nothing."""
    out = Path(cfg.output)
    return out.parent / f".{out.name}.checkpoints"


def measure_card(decoupled: ConvNet, plain: ConvNet, test: ImageSet, val: ImageSet | None) -> dict:
    """Side-by-side figures of the two nets on the test split (reported,
    never used for a choice) and on the validation split."""
    from .acceleration import flop_summary

    test_paths = path_summary(decoupled, test.images, test.labels)
    plain_test = evaluate_accuracy(plain, test)["accuracy"]
    flops = flop_summary(decoupled, test.images)
    card = {
        "test": {
            "images": len(test),
            "decoupled_accuracy": test_paths["accuracy"],
            "plain_accuracy": plain_test,
            "accuracy_gap_points": 100 * (plain_test - test_paths["accuracy"]),
            "active_fraction": test_paths["active_fraction"],
            "distinct_paths": test_paths["distinct_paths"],
            "path_bits": test_paths["path_bits"],
            "jaccard": test_paths["jaccard"],
            "first_1000_decoupled_accuracy": evaluate_accuracy(decoupled, test.head(1000))["accuracy"],
            "flops": flops,
        },
        "gated_widths": decoupled.gated_widths,
    }
    if val is not None:
        card["validation"] = {
            "images": len(val),
            "decoupled_accuracy": evaluate_accuracy(decoupled, val)["accuracy"],
            "plain_accuracy": evaluate_accuracy(plain, val)["accuracy"],
        }
    return card


def versions() -> dict:
    import sklearn
    import safetensors

    return {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "scikit-learn": sklearn.__version__, "safetensors": safetensors.__version__,
        "machine": platform.machine(), "threads": torch.get_num_threads(),
    }
