"""The digits demo: data, a tiny end-to-end run, resume after an interruption, visualize."""

import csv
import json

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from deformconv.cli import _parser, main  # noqa: E402
from deformconv.demos.classify import run_demo  # noqa: E402
from deformconv.demos.digits import (  # noqa: E402
    ScaledDigits,
    load_digits,
    scale_bucket,
    split_digits,
)
from deformconv.demos.train import Distributed, load_checkpoint  # noqa: E402

TINY = [
    "--epochs",
    "2",
    "--samples-per-epoch",
    "64",
    "--batch-size",
    "32",
    "--val-samples",
    "32",
    "--test-samples",
    "48",
    "--dilation-samples",
    "32",
    "--width",
    "8",
    "--no-progress",
]
FILES = [
    "plain.pt",
    "deformable.pt",
    "results.csv",
    "results.md",
    "effective_dilation.csv",
    "effective_dilation.md",
    "sampling_locations.png",
    "offset_field.png",
    "args.json",
]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *TINY]) == 0
    return out


def test_split_is_disjoint_and_seeded(digits):
    images, labels = digits
    assert images.shape == (5000, 28, 28) and float(images.max()) == 1.0
    s = split_digits(len(images), seed=3)
    sets = [set(s.train.tolist()), set(s.val.tolist()), set(s.test.tolist())]
    assert sum(map(len, sets)) == 5000 and len(set.union(*sets)) == 5000
    assert torch.equal(split_digits(5000, seed=3).test, s.test)
    assert not torch.equal(split_digits(5000, seed=4).test, s.test)
    assert len(set(labels[s.test].tolist())) == 10  # shuffled, not the sorted head


def test_samples_are_reproducible_and_use_only_their_split(digits):
    images, labels = digits
    s = split_digits(5000, seed=0)
    test = ScaledDigits(images, labels, s.test, length=50, stream="test", seed=0, rotation=20)
    again = ScaledDigits(images, labels, s.test, length=50, stream="test", seed=0, rotation=20)
    assert torch.equal(test[7][0], again[7][0])
    again.set_epoch(1)
    assert not torch.equal(test[7][0], again[7][0])
    assert all(test.placement(i)[0] in set(s.test.tolist()) for i in range(50))
    for i in range(50):
        image, label, bucket, box = test[i]
        digit, scale, _, _, _ = test.placement(i)
        assert label == labels[digit] and bucket == scale_bucket(scale, (0.5, 2.5))
        y0, x0, y1, x1 = box.long().tolist()
        assert 0 <= y0 < y1 <= 64 and 0 <= x0 < x1 <= 64
        ink = image[0] > 0.2
        assert ink[y0:y1, x0:x1].sum() == ink.sum()  # the box holds all the ink


def test_scale_buckets_follow_the_digit_size(digits):
    images, labels = digits
    data = ScaledDigits(images, labels, torch.arange(5000), length=300, seed=1)
    heights = {0: [], 1: [], 2: []}
    for i in range(300):
        _, _, bucket, box = data[i]
        heights[bucket].append(float(box[2] - box[0]))
    means = [sum(h) / len(h) for h in heights.values()]
    assert means[0] < means[1] < means[2]


def test_tiny_demo_writes_all_its_files(tiny_run):
    for name in FILES:
        assert (tiny_run / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tiny_run / "results.csv")))
    assert [r["model"] for r in rows] == ["plain", "deformable"]
    assert all(0 <= float(r["test_overall"]) <= 1 for r in rows)
    dil = list(csv.DictReader(open(tiny_run / "effective_dilation.csv")))
    assert [r["layer"] for r in dil] == ["blocks.0.conv", "blocks.1.conv", "blocks.2.conv"]
    assert json.loads((tiny_run / "args.json").read_text())["epochs"] == 2
    state = load_checkpoint(tiny_run / "deformable.pt")
    assert state["epoch"] == 2 and any("conv_offset" in k for k in state["model"])
    assert not list(tiny_run.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_run, capsys):
    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(epoch):
        raise Interrupt

    args = _parser().parse_args(["demo", "--out", str(tmp_path), *TINY])
    with pytest.raises(Interrupt):
        run_demo(args, Distributed(), on_epoch_end=stop_after_first_epoch)
    first = load_checkpoint(tmp_path / "plain.pt")
    assert first["epoch"] == 1 and not (tmp_path / "deformable.pt").exists()

    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path), "--resume", *TINY]) == 0
    assert f"resumed from {tmp_path / 'plain.pt'} after epoch 1/2" in capsys.readouterr().out
    resumed = load_checkpoint(tmp_path / "plain.pt")
    assert resumed["epoch"] == 2 and resumed["history"][0] == first["history"][0]
    # an interrupted + resumed run ends where an uninterrupted one does
    straight = load_checkpoint(tiny_run / "plain.pt")
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, msg=key)

    capsys.readouterr()
    assert main(["demo", "--out", str(tmp_path), "--resume", *TINY]) == 0  # nothing left to train
    assert "after epoch 2/2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different settings"):
        main(
            ["demo", "--out", str(tmp_path), "--resume", *TINY[:-1], "16"][:-1] + ["--width", "16"]
        )


def test_visualize_writes_pngs_that_are_not_blank(tiny_run, tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    out = tmp_path / "figs"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(tiny_run / "deformable.pt"),
                "--out",
                str(out),
                "--samples",
                "16",
            ]
        )
        == 0
    )
    for name in ["sampling_locations.png", "offset_field.png"]:
        image = plt.imread(out / name)[..., :3]
        assert image.shape[0] > 200 and image.std() > 0.05, name
        assert (image.reshape(-1, 3) < 0.2).all(1).mean() > 0.01  # dark canvas drawn
    assert (out / "effective_dilation.csv").exists() and (out / "args.json").exists()


def test_visualize_rejects_a_plain_checkpoint(tiny_run):
    with pytest.raises(SystemExit, match="plain model"):
        main(["visualize", "--checkpoint", str(tiny_run / "plain.pt")])


def test_tables_round_once(tmp_path):
    # 0.536549 is 53.7 % to one place; rounding it to 4 places first (0.5365 -> "53.6")
    # would make the CSV-backed table disagree with the printed line.
    from deformconv.demos.detect import results_markdown
    from deformconv.demos.figures import write_table

    row = {"variant": "both", "seed": 0, "map50": 0.536549, "train_seconds": 12.5}
    keys = ["map70", "map", "map_small", "map_medium", "map_large", "val_map50", "val_map70"]
    row.update(dict.fromkeys(keys, 0.5))
    markdown = results_markdown([row])
    assert markdown.splitlines()[2].startswith("| both | 53.7 | 50.0 |")
    write_table([row], tmp_path, "results", markdown)
    (written,) = csv.DictReader(open(tmp_path / "results.csv"))
    assert written["map50"] == "0.5365" and written["seed"] == "0" and written["variant"] == "both"
    assert (tmp_path / "results.md").read_text() == markdown


def test_write_csv_rejects_or_drops_keys_outside_its_fields(tmp_path):
    from deformconv.demos.figures import write_csv

    rows = [{"variant": "plain", "miou": 0.536549, "note": "extra"}]
    with pytest.raises(ValueError, match="note"):
        write_csv(tmp_path / "strict.csv", rows, ["variant", "miou"])
    write_csv(tmp_path / "loose.csv", rows, ["variant", "miou"], ignore_other_keys=True)
    (row,) = csv.DictReader(open(tmp_path / "loose.csv"))
    assert row == {"variant": "plain", "miou": "0.5365"}
