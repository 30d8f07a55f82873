"""``kill -9`` of ``deformconv demo`` mid-epoch and mid-checkpoint-write, then ``--resume``,
ends with exactly the weights of an uninterrupted run (CPU, 1 thread: bitwise)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from deformconv.demos.train import PAUSE_ENV, load_checkpoint  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = [
    "--epochs", "2", "--samples-per-epoch", "256", "--batch-size", "32", "--width", "8",
    "--canvas", "32", "--scale-min", "0.5", "--scale-max", "1.0",
    "--val-samples", "16", "--test-samples", "16", "--dilation-samples", "8",
    "--threads", "1", "--no-progress",
]  # fmt: skip
TIMEOUT = 300


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    path = [str(SRC), env.get("PYTHONPATH", "")]
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(path))
    env.update(extra)
    return env


def _demo(out: Path, *flags: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "deformconv.cli", "demo", "--out", str(out), *TINY, *flags],
        env=_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> None:
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0, err[-3000:]


def _kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=TIMEOUT)
    assert process.returncode == -signal.SIGKILL


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert process.poll() is None, "the demo ended before writing " + str(path)
        assert time.monotonic() < deadline, "timed out waiting for " + str(path)
        time.sleep(0.005)


def _assert_same_training(a: Path, b: Path) -> None:
    for name in ("plain.pt", "deformable.pt"):
        x, y = load_checkpoint(a / name), load_checkpoint(b / name)
        assert x["epoch"] == y["epoch"] == 2, name
        assert x["model"].keys() == y["model"].keys()
        for key, value in x["model"].items():
            assert torch.equal(value, y["model"][key]), f"{name}: {key} differs"
        for (i, s), (j, t) in zip(
            x["optimizer"]["state"].items(), y["optimizer"]["state"].items(), strict=True
        ):
            assert i == j and s.keys() == t.keys()
            assert all(torch.equal(s[k], t[k]) for k in s), f"{name}: optimizer state {i}"
        assert [h["loss"] for h in x["history"]] == [h["loss"] for h in y["history"]], name


@pytest.mark.slow
def test_killed_mid_epoch_and_mid_write_then_resumed_equals_uninterrupted(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _finish(_demo(straight))

    # 1. kill -9 halfway through writing the plain model's second checkpoint
    run = _demo(crashed, **{PAUSE_ENV: "plain.pt:2"})
    assert run.stderr is not None
    for line in run.stderr:
        if line.startswith("save_checkpoint: paused writing"):
            break
    else:
        pytest.fail(f"the demo never paused in save_checkpoint (exit {run.wait()})")
    _kill(run)
    torn = list(crashed.glob(".plain.pt.*.tmp"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0
    assert load_checkpoint(crashed / "plain.pt")["epoch"] == 1  # the previous one, whole

    # 2. resume, and kill -9 in the middle of the deformable model's second epoch. Where
    # the sleep overshoots (this run faster than the uninterrupted one), start again from
    # a copy of the folder with a shorter sleep.
    before = tmp_path / "before_step_2"
    shutil.copytree(crashed, before)
    delay = load_checkpoint(straight / "deformable.pt")["history"][1]["seconds"] / 2
    for _ in range(4):
        run = _demo(crashed, "--resume")
        _wait_for(crashed / "deformable.pt", run)  # its epoch 1 is on disk
        time.sleep(delay)
        _kill(run)
        if load_checkpoint(crashed / "deformable.pt")["epoch"] == 1:
            break
        shutil.rmtree(crashed)
        shutil.copytree(before, crashed)
        delay /= 4
    else:
        pytest.fail("every kill came after the deformable model's second epoch had ended")
    assert load_checkpoint(crashed / "plain.pt")["epoch"] == 2

    # 3. resume to the end
    _finish(_demo(crashed, "--resume"))
    assert not list(crashed.glob(".*.tmp"))
    _assert_same_training(straight, crashed)
    assert (crashed / "results.md").read_text() == (straight / "results.md").read_text()
