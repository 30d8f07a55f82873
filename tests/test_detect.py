"""The detect demo: COCO metrics on hand-made cases with known AP, the detector's pieces,
and a tiny end-to-end run writing every output file."""

from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from deformconv.demos.detect_eval import SIZE_EDGES, coco_metrics  # noqa: E402

ALL = ("map50", "map70", "map")


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}


def _pred(boxes, labels, scores):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


# one small (sqrt area 10), one medium (30) and one large (60) object per image
SCENE = [
    _target([[5, 5, 15, 15], [40, 10, 70, 40], [20, 50, 80, 110]], [1, 4, 10]),
    _target([[60, 60, 70, 70], [0, 0, 30, 30]], [2, 2]),
]


def test_size_edges_split_the_scene_objects():
    assert 10 < SIZE_EDGES[0] < 30 < SIZE_EDGES[1] < 60


def test_perfect_predictions_give_ap_one():
    preds = [
        _pred(t["boxes"].tolist(), t["labels"].tolist(), [0.9] * len(t["labels"])) for t in SCENE
    ]
    m = coco_metrics(preds, SCENE, num_classes=10)
    for key in (*ALL, "map_small", "map_medium", "map_large", "ar100"):
        assert m[key] == pytest.approx(1.0), key


@pytest.mark.parametrize(
    ("dx", "iou"),
    [(2.0, 8 / 12), (1.0, 9 / 11), (4.0, 6 / 14)],  # a 10x10 box shifted by dx pixels
)
def test_known_shift_gives_known_ap(dx, iou):
    target = [_target([[10, 10, 20, 20]], [3])]
    pred = [_pred([[10 + dx, 10, 20 + dx, 20]], [3], [0.8])]
    m = coco_metrics(pred, target, num_classes=10)
    thresholds = torch.linspace(0.5, 0.95, 10)
    assert m["map50"] == pytest.approx(1.0 if iou >= 0.5 else 0.0)
    assert m["map70"] == pytest.approx(1.0 if iou >= 0.7 else 0.0)
    # COCO AP: the fraction of the ten IoU thresholds 0.5:0.05:0.95 the box passes
    assert m["map"] == pytest.approx(float((thresholds <= iou + 1e-9).float().mean()))


def test_half_of_the_objects_found_gives_51_of_101():
    # one class, two objects, one perfect detection: precision 1 up to recall 0.5, then
    # nothing; COCO's 101 recall points 0, 0.01, ..., 0.5 score 1 -> AP = 51 / 101
    target = [_target([[0, 0, 10, 10], [30, 30, 40, 40]], [5, 5])]
    pred = [_pred([[0, 0, 10, 10]], [5], [0.9])]
    m = coco_metrics(pred, target, num_classes=10)
    for key in ALL:
        assert m[key] == pytest.approx(51 / 101)


def test_a_false_positive_ranked_first_halves_the_precision():
    # detections: a wrong box (score 0.9) then the right one (0.8): precision 1/2 at recall 1
    target = [_target([[0, 0, 10, 10]], [1])]
    pred = [_pred([[50, 50, 60, 60], [0, 0, 10, 10]], [1, 1], [0.9, 0.8])]
    m = coco_metrics(pred, target, num_classes=10)
    assert m["map50"] == pytest.approx(0.5)


def test_duplicates_after_full_recall_do_not_lower_ap():
    target = [_target([[0, 0, 10, 10]], [1])]
    pred = [_pred([[0, 0, 10, 10], [0, 0, 10, 10]], [1, 1], [0.9, 0.5])]
    assert coco_metrics(pred, target, num_classes=10)["map50"] == pytest.approx(1.0)


def test_wrong_class_scores_zero_and_classes_average():
    # class 1 found, class 2 detected with the wrong label: mean over the two classes
    target = [_target([[0, 0, 10, 10], [30, 30, 40, 40]], [1, 2])]
    pred = [_pred([[0, 0, 10, 10], [30, 30, 40, 40]], [1, 3], [0.9, 0.9])]
    assert coco_metrics(pred, target, num_classes=10)["map50"] == pytest.approx(0.5)


def test_ap_by_size():
    # the small object found, the medium and large ones missed
    preds = [_pred([[5, 5, 15, 15]], [1], [0.9]), _pred([[60, 60, 70, 70]], [2], [0.9])]
    m = coco_metrics(preds, SCENE, num_classes=10)
    assert m["map_small"] == pytest.approx(1.0)
    assert m["map_medium"] == 0.0 and m["map_large"] == 0.0


def test_no_detections():
    preds = [_pred([], [], []) for _ in SCENE]
    assert set(coco_metrics(preds, SCENE, num_classes=10).values()) == {0.0}


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="coco_metrics: predictions and targets must have one"):
        coco_metrics([], SCENE, num_classes=10)


# --- the detector and the demo ------------------------------------------------------

from deformconv.cli import main  # noqa: E402
from deformconv.demos.detect import (  # noqa: E402
    VARIANTS,
    DetectorConfig,
    build_detector,
    parse_variants,
    roi_bins,
)
from deformconv.nn import DeformConv2d, DeformMultiScaleRoIAlign  # noqa: E402


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_have_the_papers_parts(variant):
    model = build_detector(DetectorConfig(variant, width=8, hidden=16))
    deform_convs = [m for m in model.backbone.modules() if isinstance(m, DeformConv2d)]
    assert len(deform_convs) == (3 if variant in ("deform_conv", "both") else 0)
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, DeformMultiScaleRoIAlign) == (variant in ("deform_roi_pool", "both"))


def test_variants_start_from_the_same_detections():
    # deformable parts start as the plain ones: same weights -> same detections
    images = [torch.rand(1, 64, 64)]
    outs = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build_detector(DetectorConfig(variant, width=8, hidden=16, canvas=64)).eval()
        with torch.no_grad():
            outs.append(model(images)[0])
    for out in outs[1:]:
        torch.testing.assert_close(out["boxes"], outs[0]["boxes"], atol=1e-4, rtol=1e-4)


def test_roi_bins_follow_the_offsets():
    pool = DeformMultiScaleRoIAlign(["0"], 2, 2, in_channels=3, hidden_features=4, record=True)
    with torch.no_grad():
        pool.offset_fc[-1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0]))
    box = torch.tensor([[8.0, 16.0, 48.0, 36.0]])  # 40 x 20 pixels
    pool({"0": torch.rand(1, 3, 16, 16)}, [box], [(64, 64)])
    bins = roi_bins(pool, box)
    # bin (0, 0) moves by 0.1 * 1 * 40 = 4 px right; bin (1, 1) by 0.1 * -2 * 20 = -4 px up
    torch.testing.assert_close(bins[0, 0, 0], torch.tensor([12.0, 16.0, 32.0, 26.0]))
    torch.testing.assert_close(bins[0, 1, 1], torch.tensor([28.0, 22.0, 48.0, 32.0]))
    torch.testing.assert_close(bins[0, 0, 1], torch.tensor([28.0, 16.0, 48.0, 26.0]))


def test_parse_variants():
    assert parse_variants("all") == list(VARIANTS)
    assert parse_variants("both, plain") == ["plain", "both"]
    with pytest.raises(ValueError, match="--variants must be 'all' or"):
        parse_variants("plain,deform_roi")


TINY = [
    "--task", "detect", "--steps", "2", "--batch-size", "2", "--width", "8", "--hidden", "16",
    "--canvas", "64", "--height-range", "10,40", "--digits-per-scene", "1,3",
    "--val-samples", "2", "--test-samples", "4", "--checkpoint-every", "1", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_tiny_run_writes_every_output(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    expected = {f"{v}.pt" for v in VARIANTS}
    expected |= {"results.csv", "results.md", "detections.png", "roi_bins.png", "args.json"}
    assert expected <= names
    rows = list(csv.DictReader(open(tiny_run / "results.csv")))
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for row in rows:
        for key in ("map50", "map70", "map", "val_map50", "val_map70"):
            assert 0.0 <= float(row[key]) <= 1.0
    assert "| deform_roi_pool |" in (tiny_run / "results.md").read_text()
    args = json.loads((tiny_run / "args.json").read_text())
    assert args["task"] == "detect" and args["variants"] == "all" and args["lr"] == 1e-3


def test_resume_does_not_retrain_and_checks_settings(tiny_run, capsys):
    before = torch.load(tiny_run / "plain.pt", weights_only=False)
    assert before["step"] == 2
    argv = ["demo", "--out", str(tiny_run), "--resume", *TINY, "--variants", "plain"]
    assert main(argv) == 0
    after = torch.load(tiny_run / "plain.pt", weights_only=False)
    for key, value in before["model"].items():
        torch.testing.assert_close(after["model"][key], value, msg=key)
    with pytest.raises(ValueError, match="different settings"):
        main([*argv, "--hidden", "32"])


def test_run_rounds_scores_only_in_its_tables(tmp_path, monkeypatch, capsys):
    # 0.536549 is 53.7 % to one place; a row rounded to 4 places before the table
    # (0.5365 -> "53.6") would make results.md disagree with the printed line.
    import deformconv.demos.detect as detect

    exact = dict.fromkeys(("map50", "map70", "map", "map_small", "map_medium"), 0.536549)
    exact.update(map_large=0.25, ar100=0.5)
    monkeypatch.setattr(detect, "evaluate_detector", lambda *args, **kwargs: dict(exact))
    assert main(["demo", "--out", str(tmp_path), *TINY, "--variants", "plain"]) == 0
    assert "test mAP@0.5 53.7, mAP@0.7 53.7 (val 53.7 / 53.7)" in capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| plain |"))
    assert line.startswith("| plain | 53.7 | 53.7 | 53.7 | 53.7 | 53.7 | 25.0 | 53.7 | 53.7 |")
    (row,) = csv.DictReader(open(tmp_path / "results.csv"))
    assert row["map50"] == "0.5365" and row["val_map70"] == "0.5365" and row["ar100"] == "0.5"


def test_seeds_write_one_checkpoint_and_row_per_variant_and_seed(tmp_path):
    argv = ["demo", "--out", str(tmp_path), *TINY, "--variants", "plain", "--seeds", "0,1"]
    assert main(argv) == 0
    assert {"plain_seed0.pt", "plain_seed1.pt"} <= {p.name for p in tmp_path.iterdir()}
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["variant"], r["seed"]) for r in rows] == [("plain", "0"), ("plain", "1")]
    first = torch.load(tmp_path / "plain_seed0.pt", weights_only=False)["model"]
    second = torch.load(tmp_path / "plain_seed1.pt", weights_only=False)["model"]
    assert any(not torch.equal(first[k], second[k]) for k in first)  # seeds differ
    table = (tmp_path / "results.md").read_text()
    line = next(x for x in table.splitlines() if x.startswith("| plain |"))
    assert line.endswith("| 2 |") and "±" in line


def test_results_markdown_gives_mean_and_std_over_seeds():
    from deformconv.demos.detect import results_markdown

    keys = ("map50", "map70", "map", "map_small", "map_medium", "map_large")
    base = {k: 0.5 for k in (*keys, "val_map50", "val_map70")}
    rows = [
        {**base, "variant": "plain", "seed": 0, "map50": 0.2, "train_seconds": 10.0},
        {**base, "variant": "plain", "seed": 1, "map50": 0.4, "train_seconds": 30.0},
        {**base, "variant": "both", "seed": 0, "train_seconds": 5.0},
    ]
    lines = results_markdown(rows).splitlines()
    assert lines[2] == (
        "| plain | 30.0 ± 14.1 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 "
        "| 50.0 ± 0.0 | 50.0 ± 0.0 | 50.0 ± 0.0 | 20 | 2 |"
    )
    assert lines[3] == "| both | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 5 | 1 |"
