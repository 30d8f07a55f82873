"""Determinism: the CPU paths are deterministic; a nondeterministic backward raises torch's error."""

from __future__ import annotations

import pytest
import torch

import deformconv
from _cases import Config, make_problem
from _ecosystem import OP_PATH, PATHS, SpyKernels, on_path

CFG = Config(batch=2, in_channels=4, out_channels=4, size=(8, 7), mask=True, offset_groups=2)
NOT_DETERMINISTIC = r"does not have a deterministic implementation"


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


class NondeterministicKernels(SpyKernels):
    DETERMINISTIC_BACKWARD = False  # as a backend with an atomic-add backward declares


def _grads(path, device="cpu", kernels=SpyKernels):
    tensors = [
        t.to(device).requires_grad_(True)
        for t in make_problem(CFG, dtype=torch.float32, offset_scale=3.0)
    ]
    x, offset, weight, bias, mask = tensors
    with on_path(path, kernels):
        out = deformconv.deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
        out.square().sum().backward()
    return [out.detach(), *(t.grad for t in tensors)]


@pytest.mark.parametrize("path", PATHS)
def test_cpu_paths_are_deterministic(path, deterministic):
    first = _grads(path)
    torch.manual_seed(0)
    second = _grads(path)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # bitwise


def test_nondeterministic_backward_raises_standard_error(deterministic):
    with pytest.raises(RuntimeError, match=NOT_DETERMINISTIC):
        _grads(OP_PATH, kernels=NondeterministicKernels)


def test_nondeterministic_backward_runs_without_the_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    out, *grads = _grads(OP_PATH, kernels=NondeterministicKernels)
    assert all(g is not None for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", deformconv.available_backends("cuda"))
def test_cuda_paths_under_deterministic_mode(path, deterministic):
    """Each CUDA path either is deterministic (bitwise-equal runs) or raises torch's error."""
    try:
        first = _grads(path, "cuda")
    except RuntimeError as error:
        assert NOT_DETERMINISTIC in str(error)
        return
    second = _grads(path, "cuda")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
