"""Layout changes of the CPU kernels: channels-first <-> channels-last rows, a forward
chunk's rows into the output maps, a weight's (C_pg, K) <-> (K, C_pg) transposes.

Oracle: torch's permute-copy (exact: the transposes only move elements) and a float64
sum for the per-channel sums of ``grad_output``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")
_direct = pytest.importorskip("deformconv.kernels._numba_direct")
_layout = pytest.importorskip("deformconv.kernels._layout")
_numba_threads = pytest.importorskip("deformconv.kernels._numba_threads")


@pytest.fixture(autouse=True, params=["transpose_kernels", "torch_copy"])
def route(request, monkeypatch):
    # Every test runs through the Numba transposes and through the small tensors' route.
    small = 0 if request.param == "transpose_kernels" else 2**62
    monkeypatch.setattr(_layout, "SMALL_ELEMENTS", small)
    return request.param


# (N, C, H, W): 8x8 tiles only; channel and pixel tails; one pixel; more pixels than a task
SHAPES = [(2, 16, 8, 4), (3, 13, 7, 5), (1, 9, 1, 1), (2, 24, 9, 11), (1, 3, 40, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last_rows_and_sums(shape, dtype):
    n, c, h, w = shape
    src = torch.randn(shape, dtype=torch.float64).to(dtype)
    rows = torch.empty(n * h * w, c, dtype=dtype)
    sums = _layout._channels_last_into(rows, src, with_sums=True)
    assert torch.equal(rows, src.permute(0, 2, 3, 1).reshape(-1, c))
    assert sums is not None and sums.dtype == torch.float64
    torch.testing.assert_close(sums, src.double().sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert _layout._channels_last_into(rows, src) is None


@pytest.mark.parametrize("shape", SHAPES)
def test_channels_first_roundtrip(shape):
    n, c, h, w = shape
    rows = torch.randn(n * h * w, c)
    out = _layout._to_channels_first(rows, n, h, w)
    assert out.is_contiguous()
    assert torch.equal(out, rows.view(n, h, w, c).permute(0, 3, 1, 2))


# (N, C, L) maps; (first image, first pixel, images, pixels) of the chunk: whole images,
# a middle image alone, a slice inside an image, a slice at an image's end, odd sizes
CHUNKS = [
    ((3, 16, 40), (0, 0, 3, 40)),
    ((3, 16, 40), (1, 0, 1, 40)),
    ((2, 13, 37), (1, 5, 1, 19)),
    ((2, 24, 37), (0, 29, 1, 8)),
    ((4, 9, 3), (2, 0, 2, 3)),
]


@pytest.mark.parametrize(("shape", "chunk"), CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_rows_into_maps(shape, chunk, dtype):
    n, c, length = shape
    b0, l0, images, pixels = chunk
    maps = torch.randn(shape, dtype=dtype)
    before = maps.clone()
    rows = torch.randn(images * pixels, c, dtype=dtype)
    _layout._rows_into_maps(rows, maps, b0, l0)
    expected = before.clone()
    expected[b0 : b0 + images, :, l0 : l0 + pixels] = rows.view(images, pixels, c).transpose(1, 2)
    assert torch.equal(maps, expected)  # the chunk written, everything else untouched


@pytest.mark.parametrize("shape", [(6, 16, 9), (5, 13, 9), (3, 9, 1), (4, 1, 25), (0, 8, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transpose_each(shape, dtype):
    src = torch.randn(shape, dtype=dtype)
    out = torch.empty(shape[0], shape[2], shape[1], dtype=dtype)
    _layout._transpose_each(src, out)
    assert torch.equal(out, src.transpose(1, 2))


def test_sources_of_any_layout_and_dtype():
    src = torch.randn(2, 24, 5, 6)
    for s in (
        src.to(memory_format=torch.channels_last),  # plain copy
        src.half(),  # converted first
        src.transpose(2, 3).contiguous().transpose(2, 3),  # strided
        torch.zeros(1).expand(2, 24, 5, 6),  # broadcast, as sum().backward() gives
    ):
        rows = torch.empty(60, 24)
        sums = _layout._channels_last_into(rows, s, with_sums=True)
        ref = s.float().permute(0, 2, 3, 1).reshape(-1, 24)
        assert torch.equal(rows, ref)
        torch.testing.assert_close(sums, ref.double().sum(0), rtol=1e-5, atol=1e-5)
        # the same order of summation whatever the layout: the same bits
        same = _layout._channels_last_into(torch.empty(60, 24), s.contiguous(), with_sums=True)
        assert torch.equal(sums, same)


def test_empty_batch():
    rows = torch.empty(0, 8)
    sums = _layout._channels_last_into(rows, torch.empty(0, 8, 3, 3), with_sums=True)
    assert torch.equal(sums, torch.zeros(8, dtype=torch.float64))
    assert _layout._to_channels_first(rows, 0, 3, 3).shape == (0, 8, 3, 3)


def test_sums_do_not_depend_on_the_thread_count():
    src = torch.randn(3, 40, 9, 13)
    rows = torch.empty(3 * 9 * 13, 40)
    got = []
    for threads in (1, 2):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with _numba_threads.threads():  # Numba follows torch's count, as in a call
                got.append(_layout._channels_last_into(rows, src, with_sums=True))
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(got[0], got[1])


@pytest.mark.parametrize("c_pg", [8, 1])  # grouped, depthwise
def test_kept_scratch_is_never_returned_and_works_across_modes(c_pg):
    # the channels-last scratch is reused by the next call: results must not alias it, and
    # scratch first made in inference mode must stay writable outside it
    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 5)
    offset = torch.randn(2, 18, 6, 5)
    weight = torch.randn(16, c_pg, 3, 3)
    bias = torch.randn(16)
    geo = ((1, 1), (1, 1), (1, 1))
    with torch.inference_mode():
        first = _direct.forward(x, offset, None, weight, bias, *geo)
    kept = first.clone()
    grads = _direct.backward(torch.randn(2, 16, 6, 5), x, offset, None, weight, bias, *geo)
    kept_grads = [None if g is None else g.clone() for g in grads]
    _direct.forward(2 * x, offset, None, weight, bias, *geo)
    _direct.backward(torch.randn(2, 16, 6, 5), 3 * x, offset, None, weight, bias, *geo)
    assert torch.equal(first, kept)
    for g, k in zip(grads, kept_grads, strict=True):
        assert (g is None and k is None) or torch.equal(g, k)
