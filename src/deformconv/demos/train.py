"""Training and evaluation for the digit demos: single process or DDP, atomic checkpoints."""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
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
from deformconv.models import param_groups

__all__ = [
    "Distributed",
    "TrainConfig",
    "checkpoint_name",
    "evaluate",
    "init_distributed",
    "load_checkpoint",
    "parse_seeds",
    "run_task",
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


def parse_seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds 0,1,2`` as a list, else ``[--seed]``."""
    return [int(k) for k in str(args.seeds).split(",")] if args.seeds else [args.seed]


def checkpoint_name(variant: str, seed: int, several: bool) -> str:
    """``<variant>.pt``, or ``<variant>_seed<k>.pt`` when a run trains several seeds."""
    return f"{variant}_seed{seed}.pt" if several else f"{variant}.pt"


def run_task(
    args: argparse.Namespace,
    title: str,
    body: Callable[[argparse.Namespace, Distributed], int],
) -> int:
    """Run a demo task in this process or as one rank of a ``torchrun`` (DDP) job.

    Sets the thread count, joins the DDP job, writes the resolved arguments and prints a
    banner on rank 0, runs ``body(args, ddp)`` and leaves the process group.
    """
    from deformconv.cli import write_resolved_args

    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = init_distributed(args.device)
    if args.device.startswith("cuda") and ddp.world_size > 1:
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if ddp.main:
        import deformconv

        write_resolved_args(args, args.out)
        backend = deformconv.available_backends(torch.device(args.device).type)[0]
        print(
            f"deformconv {deformconv.__version__}: {title}; backend on {args.device}: "
            f"{backend}; {ddp.world_size} process(es), {torch.get_num_threads()} thread(s) each"
        )
    try:
        return body(args, ddp)
    finally:
        if ddp.world_size > 1:
            dist.destroy_process_group()


PAUSE_ENV = "DEFORMCONV_PAUSE_IN_SAVE"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that ``path`` always holds a complete checkpoint.

    The bytes go to a temporary file beside ``path``, are flushed to disk (``fsync``),
    and the file is renamed over ``path`` (atomic on POSIX and Windows), then the folder
    is synced so the rename itself survives a power cut. A process killed at any moment
    leaves either the previous checkpoint or the new one, never a torn file; temporaries
    left by killed writers are removed by the next successful write.

    For crash tests, the environment variable ``DEFORMCONV_PAUSE_IN_SAVE=NAME:EPOCH``
    makes the write of checkpoint file ``NAME`` whose ``state["epoch"]`` is ``EPOCH`` stop
    halfway, print ``save_checkpoint: paused writing <temporary>`` to stderr and sleep 60 s
    before finishing, so a test can kill the process in the middle of a write.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_checkpoint(Path(folder) / "run.pt", {"epoch": 1, "w": torch.zeros(3)})
        ...     load_checkpoint(Path(folder) / "run.pt")["w"].shape
        torch.Size([3])
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getbuffer()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        if os.environ.get(PAUSE_ENV) == f"{path.name}:{state.get('epoch')}":
            f.flush()
            print(f"save_checkpoint: paused writing {tmp}", file=sys.stderr, flush=True)
            time.sleep(60)
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for syncing on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     save_checkpoint(Path(folder) / "run.pt", {"epoch": 3, "w": torch.ones(2)})
        ...     state = load_checkpoint(Path(folder) / "run.pt")
        ...     sorted(p.name for p in Path(folder).iterdir())
        ['run.pt']
        >>> state["epoch"], state["w"].shape
        (3, torch.Size([2]))
    """
    return torch.load(path, map_location="cpu", weights_only=False)


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
    optimizer = torch.optim.AdamW(
        param_groups(
            model,
            lr=config.lr,
            offset_lr_mult=config.offset_lr_mult,
            weight_decay=config.weight_decay,
        )  # fmt: skip
    )
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
