"""Training and evaluation for the digit demos: single process or DDP, atomic checkpoints."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from deformconv.demos.digits import BUCKETS

__all__ = [
    "Distributed",
    "TrainConfig",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, linear warm-up then cosine decay per step).

    Attributes:
        epochs: passes over ``samples_per_epoch`` generated samples.
        batch_size: global batch (split evenly across DDP ranks).
        lr: peak learning rate.
        offset_lr_mult: learning-rate multiplier of every ``conv_offset`` (offset and
            mask predictors), as the DCNv2 paper's 0.1.
        weight_decay: AdamW weight decay (not applied to offsets, norms or biases).
        warmup_steps: steps of linear warm-up.
        seed: seed of the sampler's shuffling.
    """

    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    offset_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0


@dataclass(frozen=True)
class Distributed:
    """This process's place in a DDP job (world 1 without one)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op without a process group)."""
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device: str) -> Distributed:
    """Join the DDP job that ``torchrun`` describes in the environment, if any.

    Uses gloo on CPU and NCCL on CUDA. Without ``WORLD_SIZE`` > 1, returns world 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: to a temporary file beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=False)


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    offsets, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if "conv_offset" in name:
            offsets.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    if offsets:
        groups.append({"params": offsets, "weight_decay": 0.0, "lr_mult": config.offset_lr_mult})
    for g in groups:
        g["lr"] = config.lr * g["lr_mult"]
    return groups


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(
    model: nn.Module,
    dataset: Dataset[Any],
    config: TrainConfig,
    *,
    checkpoint: Path,
    resume: bool,
    device: str = "cpu",
    ddp: Distributed | None = None,
    progress: bool = True,
    desc: str = "train",
    extra_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    log: Callable[[str], None] = print,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place, checkpointing after every epoch.

    With ``resume`` and an existing ``checkpoint``, weights, optimizer state, step and
    history are restored and training continues with the next epoch (a finished run
    is not retrained). Under DDP (``ddp.world_size > 1``) the model is wrapped in
    ``DistributedDataParallel`` and each rank reads its shard through a
    ``DistributedSampler``; only rank 0 writes the checkpoint.

    Args:
        model: the network, already on ``device``.
        dataset: yields samples whose batches (after ``collate_fn``) start with
            ``(images, labels)``: labels (N,) classes for classification, (N, H, W)
            per-pixel classes for segmentation (cross-entropy over every pixel);
            ``set_epoch`` is called if present.
        config: optimisation settings.
        checkpoint: where to write ``{model, optimizer, epoch, step, history, ...}``.
        resume: continue from ``checkpoint`` if it exists.
        device: torch device string.
        ddp: this process's DDP rank, or None for a single process.
        progress: show tqdm progress bars (rank 0 only).
        desc: progress-bar label.
        extra_state: stored in the checkpoint as is (model and data settings).
        on_epoch_end: called with the number of finished epochs after each checkpoint.
        log: where messages go.
        collate_fn: the ``DataLoader``'s ``collate_fn`` (None: the default one).

    Returns:
        The history: one ``{"epoch", "loss", "accuracy", "seconds"}`` per epoch.
    """
    from tqdm.auto import tqdm

    ddp = ddp or Distributed()
    per_rank = max(config.batch_size // ddp.world_size, 1)
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset,
        num_replicas=ddp.world_size,
        rank=ddp.rank,
        shuffle=True,
        seed=config.seed,
        drop_last=True,
    )
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, drop_last=True, collate_fn=collate_fn
    )
    optimizer = torch.optim.AdamW(_param_groups(model, config))
    total = config.epochs * len(loader)
    start_epoch, step, history = 0, 0, []
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if ddp.main:
            log(f"{desc}: resumed from {checkpoint} after epoch {start_epoch}/{config.epochs}")
    net: nn.Module = model
    if ddp.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index or 0] if device.startswith("cuda") else None,
        )

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        net.train()
        seen, correct, loss_sum, started = 0, 0, 0.0, time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"{desc} {epoch + 1}/{config.epochs}",
            disable=not (progress and ddp.main),
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            images, labels = batch[0], batch[1]
            for g in optimizer.param_groups:
                g["lr"] = config.lr * g["lr_mult"] * _lr_factor(step, total, config.warmup_steps)
            images, labels = images.to(device), labels.to(device)
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += labels.numel()
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += float(loss.detach()) * labels.numel()
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if ddp.main:
            log(
                f"{desc} epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.3f}, "
                f"train acc (rank 0) {record['accuracy']:.3f}, {record['seconds']:.0f} s"
            )
            save_checkpoint(
                checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "history": history,
                    "train_config": asdict(config),
                    **(extra_state or {}),
                },
            )
        ddp.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset[Any], *, batch_size: int = 128, device: str = "cpu"
) -> dict[str, float]:
    """Accuracy overall and per scale bucket, in eval mode.

    Returns:
        ``{"overall": acc, "small": acc, "medium": acc, "large": acc, "n": count}``.
    """
    model.eval()
    hits: list[Tensor] = []
    buckets: list[Tensor] = []
    for images, labels, bucket, _ in DataLoader(dataset, batch_size=batch_size):
        hits.append((model(images.to(device)).argmax(1).cpu() == labels).float())
        buckets.append(bucket)
    hit, bucket = torch.cat(hits), torch.cat(buckets)
    result = {"overall": float(hit.mean()), "n": float(len(hit))}
    for b, name in enumerate(BUCKETS):
        chosen = hit[bucket == b]
        result[name] = float(chosen.mean()) if len(chosen) else float("nan")
    return result
