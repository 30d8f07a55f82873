"""Runs deform_conv2d in forked children after the parent ran it (spawned by test_fork.py).

``python tests/_fork_worker.py CASE`` with CASE one of ``os_fork``, ``process``, ``pool``,
``dataloader``: the parent (2 torch threads) runs the op on a problem large enough that
its GEMMs use torch's thread pool, then forked children run it and ``dcnv3`` on small
problems (forward and backward, numba backend); the parent compares their results with its own
and with the reference backend, and prints ``OK`` and the threading layer.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys

import numba
import torch

import deformconv

torch.set_num_threads(2)
CTX = mp.get_context("fork")


def problem(batch: int, channels: int, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    w = torch.randn(channels, channels, 3, 3, generator=g)
    off = 2 * torch.randn(batch, 18, size, size, generator=g)
    mask = torch.rand(batch, 9, size, size, generator=g)
    return x, off, w, mask


SMALL = problem(2, 4, 7, seed=1)


def run(backend: str, tensors=SMALL) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in tensors]
    x, off, w, mask = leaves
    with deformconv.use_backend(backend):
        out = deformconv.deform_conv2d(x, off, w, padding=1, mask=mask)
    out.square().sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


def run_dcnv3(backend: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    leaves = [
        torch.randn(2, 6, 6, 8, generator=g).requires_grad_(),  # (N, H, W, C), 2 groups
        (2 * torch.randn(2, 6, 6, 36, generator=g)).requires_grad_(),
        torch.rand(2, 6, 6, 18, generator=g).requires_grad_(),
    ]
    with deformconv.use_backend(backend):
        out = deformconv.dcnv3(*leaves, group=2)
    out.square().sum().backward()
    return [out.detach(), *(t.grad for t in leaves)]


def child(_: int = 0) -> list:
    # plain arrays: no shared-memory handles
    return [t.numpy() for t in run("numba") + run_dcnv3("numba")]


class Dataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        return run("numba")[0][0]


def in_children(case: str) -> list[list[torch.Tensor]]:
    if case == "os_fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(w, pickle.dumps(child()))
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        assert status == 0, f"child exit status {status}"
        return [pickle.loads(data)]
    if case == "process":
        queue = CTX.SimpleQueue()
        p = CTX.Process(target=lambda: queue.put(child()))
        p.start()
        result = queue.get()
        p.join()
        assert p.exitcode == 0, p.exitcode
        return [result]
    if case == "pool":
        with CTX.Pool(2) as pool:
            return pool.map(child, range(4))
    if case == "dataloader":
        loader = torch.utils.data.DataLoader(
            Dataset(), batch_size=2, num_workers=2, multiprocessing_context="fork"
        )
        outs = torch.cat(list(loader))
        return [[o[None]] for o in outs]
    raise ValueError(case)


def main(case: str) -> None:
    big = problem(4, 64, 24, seed=0)
    run("numba", big)  # the parent used the op (and torch's thread pool) before forking
    run_dcnv3("numba")
    expected = run("numba") + run_dcnv3("numba")
    reference = run("reference") + run_dcnv3("reference")
    for e, r in zip(expected, reference, strict=True):
        torch.testing.assert_close(e, r, rtol=1e-4, atol=1e-4)
    for result in in_children(case):
        for got, want in zip(result, expected, strict=False):
            got = torch.as_tensor(got)
            torch.testing.assert_close(got, want[: len(got)], rtol=1e-5, atol=1e-5)
    print("OK", numba.threading_layer())


if __name__ == "__main__":
    main(sys.argv[1])
