"""The detect demo: torchvision's Faster R-CNN on digit scenes, the paper's Table 3 rows.

Four variants of one detector, trained from scratch on
:class:`~deformconv.demos.scenes.DigitScenes` (10 digit classes):

- ``plain``: a small backbone of ours (:class:`Backbone`) and ``MultiScaleRoIAlign``;
- ``deform_conv``: the backbone's last three 3x3 convolutions made deformable by
  :func:`deformconv.deformify`;
- ``deform_roi_pool``: :class:`deformconv.nn.DeformMultiScaleRoIAlign` as the box pooler;
- ``both``: the two together.

Every variant starts from the same weights (the deformable parts start as the plain
ones), sees the same scenes in the same order, and is scored by pycocotools on the
same validation and test scenes (:func:`deformconv.demos.detect_eval.coco_metrics`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deformconv.demos.digits import load_digits
from deformconv.demos.figures import mean_std_cell
from deformconv.demos.scenes import DigitScenes, Scene
from deformconv.demos.train import (
    Distributed,
    checkpoint_name,
    load_checkpoint,
    parse_seeds,
    run_task,
    save_checkpoint,
)
from deformconv.models import recording

if TYPE_CHECKING:
    from deformconv.nn import DeformMultiScaleRoIAlign

__all__ = [
    "VARIANTS",
    "Backbone",
    "DetectorConfig",
    "build_detector",
    "evaluate_detector",
    "parse_variants",
    "results_markdown",
    "roi_bins",
    "run",
    "run_detect",
    "train_detector",
]

VARIANTS = ("plain", "deform_conv", "deform_roi_pool", "both")
"""The paper's Table 3 rows, in its order."""
NUM_CLASSES = 10
"""Digit classes (detection labels are ``digit + 1``; 0 is background)."""
PAPER = {  # Table 3: Faster R-CNN, VOC 2007 test, mAP@0.5 / mAP@0.7
    "plain": (78.1, 62.1),
    "deform_conv": (78.6, 63.3),
    "deform_roi_pool": (78.3, 66.6),
    "both": (79.3, 66.9),
}


@dataclass(frozen=True)
class DetectorConfig:
    """The detector's architecture (stored in checkpoints).

    Attributes:
        variant: one of :data:`VARIANTS`.
        width: channels of the backbone's stride-8 feature map.
        hidden: width of the box head's two fc layers and of the offset head.
        canvas: image side in pixels (the detector does not resize).
        anchor_sizes: anchor sides in pixels (one feature level).
        modulated: DCNv2 convolutions and a modulated RoI pooling.
    """

    variant: str = "plain"
    width: int = 64
    hidden: int = 256
    canvas: int = 128
    anchor_sizes: tuple[int, ...] = (12, 24, 48, 96)
    modulated: bool = False


class Backbone(nn.Module):
    """Three stride-2 conv-BN-ReLU, then three 3x3 conv-BN-ReLU with dilation 2 at stride 8.

    The last three convolutions play the paper's conv5 (its stride also reduced,
    with dilation 2); the ``deform_conv`` variant makes them deformable.

    Args:
        width: C_out of the stride-8 map.
        in_channels: image channels.

    Shape:
        - Input: (N, in_channels, H, W)
        - Output: (N, width, ceil(H / 8), ceil(W / 8))

    Example:
        >>> Backbone(32)(torch.zeros(2, 1, 128, 128)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, width: int = 64, in_channels: int = 1) -> None:
        super().__init__()
        self.out_channels = width  # read by torchvision's FasterRCNN

        def block(c_in: int, c_out: int, stride: int, dilation: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        half = max(width // 2, 1)
        layers = block(in_channels, half, 2, 1) + block(half, width, 2, 1)
        layers += block(width, width, 2, 1)
        for _ in range(3):
            layers += block(width, width, 1, 2)
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) → (N, width, H / 8, W / 8)."""
        return self.body(x)


def build_detector(config: DetectorConfig) -> nn.Module:
    """Build torchvision's ``FasterRCNN`` on a :class:`Backbone`, sized for CPU training.

    RPN and RoI sampling are reduced from torchvision's defaults (300 / 100 proposals
    before / after NMS, 64 anchors and 32 RoIs per image), which makes a step several times
    cheaper on CPU; the box head is a 2-layer MLP of ``hidden`` units.

    Args:
        config: the variant and sizes.

    Returns:
        The detector (``model(images, targets)`` gives losses in train mode, detections
        in eval mode); images are (1, canvas, canvas) in [0, 1].

    Example:
        >>> model = build_detector(DetectorConfig("both", width=16, hidden=32)).eval()
        >>> with torch.no_grad():
        ...     out = model([torch.rand(1, 128, 128)])
        >>> out[0]["boxes"].shape[1]
        4
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from deformconv.models import deformify
    from deformconv.nn import DeformMultiScaleRoIAlign

    if config.variant not in VARIANTS:
        raise ValueError(
            f"build_detector: variant must be one of {list(VARIANTS)}; got {config.variant!r}"
        )
    backbone = Backbone(config.width)
    box_head = TwoMLPHead(config.width * 49, config.hidden)
    box_predictor = FastRCNNPredictor(config.hidden, NUM_CLASSES + 1)
    pool: MultiScaleRoIAlign = MultiScaleRoIAlign(["0"], 7, 2)
    with torch.random.fork_rng():  # the deformable parts leave the shared weights alone
        if config.variant in ("deform_conv", "both"):
            deformify(backbone, last=3, modulated=config.modulated)
        if config.variant in ("deform_roi_pool", "both"):
            pool = DeformMultiScaleRoIAlign(
                ["0"], 7, 2, in_channels=config.width, hidden_features=config.hidden,
                modulated=config.modulated,
            )  # fmt: skip
    return FasterRCNN(
        backbone,
        min_size=config.canvas,
        max_size=config.canvas,
        image_mean=[0.1],
        image_std=[0.3],
        rpn_anchor_generator=AnchorGenerator((config.anchor_sizes,), ((1.0, 2.0),)),
        rpn_pre_nms_top_n_train=300,
        rpn_post_nms_top_n_train=100,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        rpn_batch_size_per_image=64,
        box_roi_pool=pool,
        box_head=box_head,
        box_predictor=box_predictor,
        box_batch_size_per_image=32,
    )


def _is_offset(name: str) -> bool:
    return any(k in name for k in ("conv_offset", "offset_fc", "mask_fc"))


def _optimizer(model: nn.Module, lr: float, offset_lr_mult: float) -> torch.optim.Optimizer:
    offsets, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if _is_offset(name):
            offsets.append(p)
        elif p.dim() > 1:
            decay.append(p)
        else:
            no_decay.append(p)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": 1e-4, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    if offsets:
        groups.append({"params": offsets, "weight_decay": 0.0, "lr_mult": offset_lr_mult})
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    return torch.optim.AdamW(groups)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batch(scenes: DigitScenes, indices: range, device: str) -> tuple[list[Tensor], list[dict]]:
    batch: list[Scene] = [scenes[i] for i in indices]
    images = [s.image.to(device) for s in batch]
    targets = [{"boxes": s.boxes.to(device), "labels": (s.classes + 1).to(device)} for s in batch]
    return images, targets


def train_detector(
    model: nn.Module,
    scenes: DigitScenes,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    offset_lr_mult: float,
    checkpoint: Path,
    resume: bool,
    checkpoint_every: int = 100,
    device: str = "cpu",
    ddp: Distributed | None = None,
    progress: bool = True,
    desc: str = "train",
    extra_state: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``steps`` steps of AdamW (warm-up, cosine decay).

    Step ``s`` reads scenes ``s·batch_size … (s+1)·batch_size - 1`` (split across DDP
    ranks), so a resumed run sees exactly the scenes an uninterrupted one would.
    A checkpoint is written atomically every ``checkpoint_every`` steps and at the end
    (rank 0); with ``resume`` an existing one is loaded and training continues after
    its step (a finished run is not retrained). Offset predictors get
    ``offset_lr_mult`` times the learning rate; gradients are clipped to norm 10.

    Args:
        model: a torchvision detector on ``device``.
        scenes: the training scenes (at least ``steps·batch_size``).
        steps: optimisation steps.
        batch_size: global batch size.
        lr: peak learning rate.
        offset_lr_mult: learning-rate multiplier of the offset predictors.
        checkpoint: the checkpoint file.
        resume: continue from ``checkpoint`` if it exists.
        checkpoint_every: steps between checkpoints.
        device: torch device string.
        ddp: this process's DDP rank, or None.
        progress: show a tqdm progress bar (rank 0).
        desc: the bar's label.
        extra_state: stored in the checkpoint as is.
        on_checkpoint: called with the step after each checkpoint.

    Returns:
        ``{"loss": mean loss of the last 50 steps, "seconds": training time, "steps"}``.
    """
    from tqdm.auto import tqdm

    ddp = ddp or Distributed()
    per_rank = max(batch_size // ddp.world_size, 1)
    optimizer = _optimizer(model, lr, offset_lr_mult)
    step, seconds, losses = 0, 0.0, []
    if resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds, losses = state["step"], state["seconds"], state["losses"]
        if ddp.main and step > 0:
            print(f"{desc}: resumed from {checkpoint} at step {step}/{steps}")
    net: nn.Module = model
    if ddp.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[torch.device(device).index or 0] if device.startswith("cuda") else None,
        )
    warmup = min(100, max(steps // 10, 1))
    bar = tqdm(
        total=steps,
        initial=step,
        desc=desc,
        disable=not (progress and ddp.main),
        leave=False,
        dynamic_ncols=True,
    )
    net.train()
    started = time.perf_counter() - seconds
    while step < steps:
        first = step * batch_size + ddp.rank * per_rank
        images, targets = _batch(scenes, range(first, first + per_rank), device)
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_mult"] * _lr_factor(step, steps, warmup)
        loss = sum(net(images, targets).values())
        assert isinstance(loss, Tensor)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        step += 1
        losses = (losses + [float(loss.detach())])[-50:]
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.3f}")
        if step % checkpoint_every == 0 or step == steps:
            seconds = time.perf_counter() - started
            if ddp.main:
                save_checkpoint(
                    checkpoint,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "seconds": seconds,
                        "losses": losses,
                        **(extra_state or {}),
                    },
                )
            ddp.barrier()
            if on_checkpoint is not None:
                on_checkpoint(step)
    bar.close()
    return {
        "loss": sum(losses) / max(len(losses), 1),
        "seconds": time.perf_counter() - started,
        "steps": float(step),
    }


@torch.no_grad()
def detect(
    model: nn.Module, scenes: DigitScenes, *, batch_size: int = 16, device: str = "cpu"
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """Run ``model`` in eval mode on every scene.

    Returns:
        ``(predictions, targets)``, one dict per scene, on the CPU.
    """
    model.eval()
    predictions, targets = [], []
    for start in range(0, len(scenes), batch_size):
        images, batch = _batch(scenes, range(start, min(start + batch_size, len(scenes))), "cpu")
        out = model([im.to(device) for im in images])
        predictions += [{k: v.cpu() for k, v in o.items()} for o in out]
        targets += batch
    return predictions, targets


def evaluate_detector(
    model: nn.Module, scenes: DigitScenes, *, device: str = "cpu"
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``scenes`` (see :func:`~.detect_eval.coco_metrics`)."""
    from deformconv.demos.detect_eval import coco_metrics

    predictions, targets = detect(model, scenes, device=device)
    return coco_metrics(predictions, targets, NUM_CLASSES)


def roi_bins(pool: DeformMultiScaleRoIAlign, boxes: Tensor) -> Tensor:
    """Where the deformable pooler's bins of ``boxes`` lie, after its last forward.

    Args:
        pool: a :class:`~deformconv.nn.DeformMultiScaleRoIAlign` on one level, just
            called on ``boxes`` while recording (its ``last_offset`` holds their offsets).
        boxes: (K, 4) x1, y1, x2, y2 in image pixels.

    Returns:
        (K, out_h, out_w, 4): each bin's x1, y1, x2, y2 in image pixels, moved by
        its offset (RoIAlign without the half-pixel shift, as torchvision's).
    """
    offset = pool.last_offset
    assert isinstance(offset, Tensor)
    (out_h, out_w), gamma = pool.output_size, pool.gamma
    scale = pool.scales[0]
    w = torch.clamp((boxes[:, 2] - boxes[:, 0]) * scale, min=1) / scale
    h = torch.clamp((boxes[:, 3] - boxes[:, 1]) * scale, min=1) / scale
    i = torch.arange(out_h, dtype=boxes.dtype)[None, :, None]
    j = torch.arange(out_w, dtype=boxes.dtype)[None, None, :]
    bw, bh = (w / out_w)[:, None, None], (h / out_h)[:, None, None]
    x1 = boxes[:, 0, None, None] + j * bw + gamma * offset[:, 0].to(boxes.dtype) * w[:, None, None]
    y1 = boxes[:, 1, None, None] + i * bh + gamma * offset[:, 1].to(boxes.dtype) * h[:, None, None]
    return torch.stack([x1, y1, x1 + bw, y1 + bh], dim=-1)


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table as Markdown (test metrics, validation mAPs, training time).

    With several seeds per variant, each cell is the mean ± std over them.
    """
    head = (
        "| variant | mAP@0.5 | mAP@0.7 | AP | AP small | AP medium | AP large "
        "| val mAP@0.5 | val mAP@0.7 | train s | seeds |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ["map50", "map70", "map", "map_small", "map_medium", "map_large"]
    keys += ["val_map50", "val_map70"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        cells = []
        for key in keys:
            cells.append(mean_std_cell([r[key] for r in mine]))
        seconds = sum(r["train_seconds"] for r in mine) / len(mine)
        cells += [f"{seconds:.0f}", str(len(mine))]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _draw_detections(
    models: dict[str, nn.Module], scenes: DigitScenes, path: Path, count: int = 4
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    names = list(models)
    fig, axes = plt.subplots(
        len(names), count, figsize=(2.4 * count, 2.5 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        model = models[name].eval()
        for col in range(count):
            scene = scenes[col]
            with torch.no_grad():
                out = model([scene.image])[0]
            ax = axes[row][col]
            ax.imshow(scene.image[0], cmap="gray", vmin=0, vmax=1)
            for box in scene.boxes.tolist():
                ax.add_patch(
                    Rectangle(
                        (box[0], box[1]),
                        box[2] - box[0],
                        box[3] - box[1],
                        fill=False,
                        ec="lime",
                        lw=0.8,
                        ls="--",
                    )  # fmt: skip
                )
            keep = out["scores"] >= 0.5
            for box, label, score in zip(
                out["boxes"][keep].tolist(),
                out["labels"][keep].tolist(),
                out["scores"][keep].tolist(),
                strict=True,
            ):
                ax.add_patch(
                    Rectangle(
                        (box[0], box[1]),
                        box[2] - box[0],
                        box[3] - box[1],
                        fill=False,
                        ec="red",
                        lw=1.0,
                    )  # fmt: skip
                )
                ax.text(box[0], box[1] - 1, f"{label - 1} {score:.2f}", color="red", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle("test scenes: ground truth (green, dashed), detections with score >= 0.5 (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_roi_bins(
    models: dict[str, nn.Module], scenes: DigitScenes, path: Path, count: int = 4
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from deformconv.nn import DeformMultiScaleRoIAlign

    names = [n for n, m in models.items() if isinstance(_box_pool(m), DeformMultiScaleRoIAlign)]
    if not names:
        return
    fig, axes = plt.subplots(
        len(names), count, figsize=(2.6 * count, 2.7 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        model: Any = models[name].eval()
        pool = _box_pool(model)
        for col in range(count):
            scene = scenes[col]
            ax = axes[row][col]
            ax.imshow(scene.image[0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if len(scene.boxes) == 0:
                continue
            box = scene.boxes[scene.boxes[:, 3].sub(scene.boxes[:, 1]).argmax()][None]
            with torch.no_grad(), recording(pool):
                images, _ = model.transform([scene.image])
                features = {"0": model.backbone(images.tensors)}
                pool(features, [box], images.image_sizes)
            bins = roi_bins(pool, box)[0].reshape(-1, 4)
            x1, y1, x2, y2 = box[0].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="yellow", lw=1.2))
            for b in bins.tolist():
                ax.add_patch(
                    Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=0.4)
                )
            centres = (bins[:, :2] + bins[:, 2:]) / 2
            ax.plot(centres[:, 0], centres[:, 1], "r.", ms=2)
            # Bins may leave the image; keep every panel framed on the scene alone.
            height, width = scene.image.shape[-2:]
            ax.set_xlim(-0.5, width - 0.5)
            ax.set_ylim(height - 0.5, -0.5)
    fig.suptitle("deformable RoI pooling: RoI (yellow), its 7x7 bins after the offsets (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _box_pool(model: Any) -> Any:
    return model.roi_heads.box_roi_pool


def parse_variants(text: str) -> list[str]:
    """``"all"`` or a comma-separated subset of :data:`VARIANTS`, in the paper's order.

    Example:
        >>> parse_variants("both,plain")
        ['plain', 'both']
    """
    if text.strip() == "all":
        return list(VARIANTS)
    chosen = {v.strip() for v in text.split(",") if v.strip()}
    if not chosen or not chosen <= set(VARIANTS):
        raise ValueError(
            f"demo --task detect: --variants must be 'all' or a comma-separated subset of "
            f"{list(VARIANTS)}; got {text!r}"
        )
    return [v for v in VARIANTS if v in chosen]


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define the scenes (stored in checkpoints)."""
    return {
        "seed": args.seed,
        "canvas": args.canvas,
        "height_range": list(args.height_range),
        "digits_per_scene": list(args.digits_per_scene),
        "val_scenes": args.val_samples,
        "test_scenes": args.test_samples,
    }


def _scenes(
    data: dict[str, Any], split: str, length: int, digits: tuple[Tensor, Tensor]
) -> DigitScenes:
    return DigitScenes(
        split,
        length,
        seed=data["seed"],
        canvas=data["canvas"],
        digits_per_scene=tuple(data["digits_per_scene"]),
        height_range=tuple(data["height_range"]),
        digits=digits,
    )


def run(args: argparse.Namespace) -> int:
    """``deformconv demo --task detect`` (also under ``torchrun``: DDP, gloo on CPU)."""
    import importlib.util

    missing = [m for m in ("torchvision", "pycocotools") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(
            f"deformconv demo --task detect needs {' and '.join(missing)}: "
            "pip install 'deformconv[detection]'"
        )
    return run_task(args, "detection on digit scenes", run_detect)


def run_detect(
    args: argparse.Namespace,
    ddp: Distributed,
    *,
    on_checkpoint: Callable[[int], None] | None = None,
) -> int:
    """Train, evaluate and draw every variant in ``args.variants``; write ``args.out``.

    Writes ``<variant>.pt`` checkpoints (``<variant>_seed<k>.pt`` with several
    ``--seeds``; a seed sets the initial weights), ``results.csv`` (one row per
    variant and seed: ``variant, seed``, test ``map50, map70, map, map_small,
    map_medium, map_large, ar100``, validation ``val_map50, val_map70``,
    ``train_loss, train_seconds``), ``results.md`` (mean ± std over seeds),
    ``detections.png`` and ``roi_bins.png`` (the first seed's models; rank 0 only).

    Args:
        args: the parsed ``deformconv demo --task detect`` options.
        ddp: this process's DDP rank.
        on_checkpoint: called with the step after each checkpoint.

    Returns:
        The exit code, 0.
    """
    from deformconv.demos.figures import write_table

    started = time.perf_counter()
    out: Path = args.out
    variants = parse_variants(args.variants)
    data = data_config(args)
    digits = load_digits()
    train_scenes = _scenes(data, "train", args.steps * args.batch_size, digits)
    val_scenes = _scenes(data, "val", args.val_samples, digits)
    test_scenes = _scenes(data, "test", args.test_samples, digits)
    seeds = parse_seeds(args)
    several = len(seeds) > 1
    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {}
    for seed in seeds:
        for variant in variants:
            config = DetectorConfig(
                variant=variant,
                width=args.width,
                hidden=args.hidden,
                canvas=args.canvas,
                anchor_sizes=tuple(args.anchor_sizes),
                modulated=args.modulated,
            )
            train_config = {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "offset_lr_mult": args.offset_lr_mult,
                "seed": seed,
            }
            settings = {"detector": asdict(config), "data": data, "train": train_config}
            checkpoint = out / checkpoint_name(variant, seed, several)
            if args.resume and checkpoint.exists():
                stored = load_checkpoint(checkpoint)
                found = {k: stored.get(k) for k in settings}
                if found != settings:
                    raise ValueError(
                        f"demo --task detect: --resume found {checkpoint} made with different "
                        f"settings ({found}); use the same options or another --out"
                    )
            torch.manual_seed(seed)  # every variant of a seed starts from the same weights
            model = build_detector(config).to(args.device)
            stats = train_detector(
                model,
                train_scenes,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                offset_lr_mult=args.offset_lr_mult,
                checkpoint=checkpoint,
                resume=args.resume,
                checkpoint_every=args.checkpoint_every,
                device=args.device,
                ddp=ddp,
                progress=not args.no_progress,
                desc=f"{variant} seed {seed}" if several else variant,
                extra_state=settings,
                on_checkpoint=on_checkpoint,
            )
            if seed == seeds[0]:
                models[variant] = model
            if ddp.main:
                val = evaluate_detector(model, val_scenes, device=args.device)
                test = evaluate_detector(model, test_scenes, device=args.device)
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        **test,
                        "val_map50": val["map50"],
                        "val_map70": val["map70"],
                        "train_loss": round(stats["loss"], 4),
                        "train_seconds": round(stats["seconds"], 1),
                    }
                )
                print(
                    f"{variant} (seed {seed}): test mAP@0.5 {100 * test['map50']:.1f}, mAP@0.7 "
                    f"{100 * test['map70']:.1f} (val {100 * val['map50']:.1f} / "
                    f"{100 * val['map70']:.1f}), trained in {stats['seconds']:.0f} s"
                )
    if ddp.main:
        markdown = results_markdown(rows)
        write_table(rows, out, "results", markdown)
        cpu = {name: m.to("cpu") for name, m in models.items()}
        _draw_detections(cpu, test_scenes, out / "detections.png")
        _draw_roi_bins(cpu, test_scenes, out / "roi_bins.png")
        print(f"\n{args.test_samples} test scenes of unseen digits (COCO AP by pycocotools):")
        print(markdown)
        print(f"wrote {out}/ ({time.perf_counter() - started:.0f} s)")
    ddp.barrier()
    return 0
