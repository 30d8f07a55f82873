"""CPU benchmark: deformconv against ``F.conv2d`` (the floor) and torchvision (the peer).

For each layer of the suite (:mod:`deformconv.bench.suite`, the one definition shared with
the GPU benchmark) it times, in one process,
forward and forward+backward of ``F.conv2d``, :func:`deformconv.deform_conv2d` (backend
``auto``) and ``torchvision.ops.deform_conv2d`` when installed: the median of ``repeat``
runs after ``warmup`` runs, the implementations taking turns in each round so that load
from other processes hits them alike, each round starting one implementation later so
that none always follows the same other one. Offsets are random (std 1 px), so the bilinear
gather does real work. Before timing, the C allocator is put into the state a process that
has run a model for a while is in (:func:`settle_allocator`), so that no implementation
pays page faults that it would not pay in training or serving.

Peak memory: for each layer and implementation a fresh subprocess builds the inputs, runs
one tiny call (so JIT code is loaded), records its resident set size, runs one
forward+backward and reports how far the peak RSS (``VmHWM`` in /proc/self/status, reset
first) rose above it: the extra memory the call needed, gradients included. tracemalloc
cannot see torch's allocations; the RSS high-water mark sees everything (Linux only).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deformconv.bench.suite import SUITE, Case

__all__ = [
    "cpu_description",
    "machine_description",
    "models_to_markdown",
    "run",
    "run_models",
    "settle_allocator",
    "to_markdown",
]


IMPLS = ("conv2d", "deformconv", "torchvision")


def _inputs(case: Case, requires_grad: bool, channels_last: bool = False) -> dict[str, Any]:
    """The layer's tensors (seeded), ``grad`` being the output gradient.

    With ``channels_last``, the input, weight and output gradient are laid out as a model
    converted with ``model.to(memory_format=torch.channels_last)`` sees them.
    """
    g = torch.Generator().manual_seed(0)
    k = case.kernel * case.kernel
    h_out, w_out = case.out_size
    x = torch.randn(case.batch, case.in_channels, *case.size, generator=g)
    c_pg = case.in_channels // case.groups
    w = torch.randn(case.out_channels, c_pg, case.kernel, case.kernel, generator=g)
    w = w / math.sqrt(c_pg * k)
    b = torch.randn(case.out_channels, generator=g)
    off = torch.randn(case.batch, 2 * case.offset_groups * k, h_out, w_out, generator=g)
    mask = None
    if case.modulated:
        shape = (case.batch, case.offset_groups * k, h_out, w_out)
        mask = torch.rand(shape, generator=g)
    grad = torch.randn(case.batch, case.out_channels, h_out, w_out, generator=g)
    if channels_last:
        x, w, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, w, grad))
    tensors = {"x": x, "w": w, "b": b, "off": off, "mask": mask}
    if requires_grad:
        for t in tensors.values():
            if t is not None:
                t.requires_grad_()
    tensors["grad"] = grad
    return tensors


def _call(impl: str, case: Case, t: dict[str, Any]) -> torch.Tensor:
    s, p = case.stride, case.padding
    if impl == "conv2d":
        return F.conv2d(t["x"], t["w"], t["b"], stride=s, padding=p, groups=case.groups)
    if impl == "deformconv":
        import deformconv

        return deformconv.deform_conv2d(
            t["x"], t["off"], t["w"], t["b"], stride=s, padding=p, mask=t["mask"]
        )
    from torchvision.ops import deform_conv2d as tv_deform_conv2d

    return tv_deform_conv2d(t["x"], t["off"], t["w"], t["b"], stride=s, padding=p, mask=t["mask"])


def _step(impl: str, case: Case, t: dict[str, Any], backward: bool) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            _call(impl, case, t)

    def forward_backward() -> None:
        _call(impl, case, t).backward(t["grad"])

    return forward_backward if backward else forward


#: glibc's allocator maps a block above its threshold (128 KiB at first) afresh, a page
#: fault per 4 KiB on first touch, until it has freed a mapped block that large; then it
#: keeps blocks up to that size (at most 32 MiB) in memory it reuses. A process running a
#: model gets there within its first steps; a fresh benchmark process does not, and there
#: ``F.conv2d``'s own layout buffers page-faulted on every call (the detection layer's
#: forward: 11.0 ms, 5.5 ms once settled; deformconv's kernels keep their scratch).
_SETTLE_BYTES = 31 << 20


def settle_allocator() -> None:
    """Free one mapped 31 MiB block, so the C allocator keeps blocks up to that size."""
    block = torch.empty(_SETTLE_BYTES, dtype=torch.uint8)
    del block


def _interleaved_ms(
    steps: dict[str, Callable[[], None]], repeat: int, warmup: int
) -> dict[str, list[float]]:
    """Run times in ms of each step, ``repeat`` rounds after ``warmup`` rounds.

    The implementations take turns within each round, so a change in machine load
    (the CPU is shared) hits all of them alike and the ratios stay fair. Each round
    starts one implementation later than the one before: no implementation always runs
    right after the same other one, whose memory traffic (torchvision's column buffers
    are gigabytes) would leave it the same cold caches every time.
    """
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeat):
        first = i % len(names) if names else 0
        for name in names[first:] + names[:first]:
            start = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _peak_memory_mib(
    impl: str, case: Case, threads: int, channels_last: bool = False
) -> float | None:
    """Growth of the peak RSS during one forward+backward, in a fresh subprocess."""
    code = (
        "import json, sys; from deformconv.bench import cpu as bench; "
        "print(json.dumps(bench._measure_peak(*json.loads(sys.argv[1]))))"
    )
    arg = json.dumps([impl, asdict(case), threads, channels_last])
    done = subprocess.run(
        [sys.executable, "-c", code, arg], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return None
    return float(json.loads(done.stdout.strip().splitlines()[-1]))


def _rss_kib(field: str) -> int:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process in KiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _measure_peak(
    impl: str, case_fields: dict[str, Any], threads: int, channels_last: bool = False
) -> float:
    """Subprocess side of :func:`_peak_memory_mib` (Linux: reads /proc/self/status)."""
    torch.set_num_threads(threads)
    case = Case(**{**case_fields, "size": tuple(case_fields["size"])})
    ch = case.groups * min(4, case.in_channels // case.groups)  # the same kernels as ``case``
    tiny = Case("tiny", 1, ch, ch, (6, 6), case.stride, 1, case.modulated, groups=case.groups)
    tt = _inputs(tiny, True, channels_last)
    _call(impl, tiny, tt).backward(tt["grad"])  # load JIT code, warm up allocators
    t = _inputs(case, True, channels_last)
    # The peak (VmHWM) is per address space, so it starts afresh in this subprocess
    # (ru_maxrss would not: Linux carries it over from the parent across exec). Writing 5
    # to clear_refs resets it to the current RSS where allowed.
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    _call(impl, case, t).backward(t["grad"])
    return (_rss_kib("VmHWM") - before) / 1024


def _first_call_seconds(threads: int) -> dict[str, float]:
    """Seconds of the first deformconv forward+backward in a fresh process.

    Measured with an empty, then a filled Numba cache (a temporary ``NUMBA_CACHE_DIR``).
    """
    code = (
        f"import time, torch, deformconv; torch.set_num_threads({threads}); "
        "x = torch.randn(2, 8, 9, 9, requires_grad=True); "
        "o = torch.randn(2, 18, 9, 9, requires_grad=True); "
        "w = torch.randn(8, 8, 3, 3, requires_grad=True); t = time.perf_counter(); "
        "deformconv.deform_conv2d(x, o, w, padding=1).sum().backward(); "
        "print(time.perf_counter() - t)"
    )
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for label in ("cold_cache", "warm_cache"):
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
            )
            if done.returncode == 0:
                out[label] = float(done.stdout.strip().splitlines()[-1])
    return out


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return "unknown"
    commit = done.stdout.strip() or "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def machine_description() -> str:
    """This machine for a table's header: its CPU (:func:`cpu_description`), CPU count and OS."""
    try:
        cpu = cpu_description(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = ""
    cpu = cpu or platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def cpu_description(cpuinfo: str) -> str:
    """The first CPU of a ``/proc/cpuinfo`` text: model name, family, model and vector width.

    Virtual machines often report a bare "AMD EPYC"; the family and model numbers still
    tell its generation (25/17: Zen 4, 26: Zen 5), which moves every ratio to oneDNN's
    convolution. Example: ``"AMD EPYC (family 25, model 17, AVX-512)"``; ``""`` when the
    text names no model.
    """
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends at its blank line
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "")
    if not name:
        return ""
    details = []
    if "cpu family" in fields:
        details.append(f"family {fields['cpu family']}")
    if "model" in fields:
        details.append(f"model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        details.append("AVX-512")
    elif "avx2" in flags:
        details.append("AVX2")
    return f"{name} ({', '.join(details)})" if details else name


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "numba"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def run(
    cases: Sequence[Any] = SUITE,
    threads: int = 2,
    repeat: int = 7,
    warmup: int = 2,
    memory: bool = True,
    torchvision: bool = True,
    first_call: bool = True,
    progress: Callable[[str], None] | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Benchmark ``cases``; returns a JSON-serialisable result (see :func:`to_markdown`).

    Args:
        cases: objects with the fields of :class:`Case`.
        threads: ``torch.set_num_threads`` for the whole run (and the subprocesses).
        repeat: timed runs per measurement (the median is reported; >= 5 recommended).
        warmup: untimed runs first.
        memory: measure peak memory per layer and implementation in subprocesses.
        torchvision: include ``torchvision.ops.deform_conv2d`` when installed.
        first_call: measure the first-call (JIT) cost with a cold and a warm Numba cache.
        progress: called with a line of text as each measurement completes.
        channels_last: every implementation gets its input, weight and output gradient
            in ``torch.channels_last``, as in a model converted to that memory format.
    """
    import deformconv

    torch.set_num_threads(threads)
    say = progress or (lambda line: None)
    impls = ["conv2d", "deformconv"]
    if torchvision:
        try:
            importlib.import_module("torchvision.ops")
            impls.append("torchvision")
        except ImportError:
            pass
    result: dict[str, Any] = {
        "machine": machine_description(),
        "threads": threads,
        "versions": _versions(),
        "commit": _git_commit(),
        "backend": deformconv.available_backends("cpu")[0],
        "repeat": repeat,
        "warmup": warmup,
        "load_before": os.getloadavg(),
        "channels_last": channels_last,
        "cases": [],
    }
    if first_call:
        result["first_call_s"] = _first_call_seconds(threads)
        say(f"first call: {result['first_call_s']}")
    settle_allocator()
    for case in cases:
        case = Case(**{f: getattr(case, f) for f in Case.__dataclass_fields__})
        row: dict[str, Any] = {"case": asdict(case), "ms": {}, "runs_ms": {}, "peak_mib": {}}
        for label, backward in (("fwd", False), ("fwd+bwd", True)):
            steps = {
                i: _step(i, case, _inputs(case, backward, channels_last), backward) for i in impls
            }
            times = _interleaved_ms(steps, repeat, warmup)
            for impl, runs in times.items():
                row["ms"][f"{impl} {label}"] = statistics.median(runs)
                row["runs_ms"][f"{impl} {label}"] = runs
                say(f"{case.name}: {impl} {label} {statistics.median(runs):.1f} ms")
        if memory:
            for impl in impls:
                row["peak_mib"][impl] = _peak_memory_mib(impl, case, threads, channels_last)
        result["cases"].append(row)
    result["load_after"] = os.getloadavg()
    result["geomean"] = _geomeans(result["cases"], impls)
    return result


def _ratios(ms: dict[str, float]) -> dict[str, float]:
    out = {}
    for label in ("fwd", "fwd+bwd"):
        out[f"deformconv/conv2d {label}"] = ms[f"deformconv {label}"] / ms[f"conv2d {label}"]
        if f"torchvision {label}" in ms:
            out[f"torchvision/deformconv {label}"] = (
                ms[f"torchvision {label}"] / ms[f"deformconv {label}"]
            )
    return out


def _geomeans(rows: list[dict[str, Any]], impls: Sequence[str]) -> dict[str, float]:
    ratios = [_ratios(r["ms"]) for r in rows]
    if not ratios:
        return {}
    return {key: math.exp(statistics.fmean(math.log(r[key]) for r in ratios)) for key in ratios[0]}


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown header and table (times in ms, medians)."""
    v = result["versions"]
    lines = [
        f"Machine: {result['machine']}; {result['threads']} threads; load average "
        f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after.  ",
        f"torch {v['torch']}, torchvision {v['torchvision']}, numba {v['numba']}, "
        f"python {v['python']}; deformconv commit {result['commit']}, "
        f"backend `{result['backend']}`.  ",
        f"Median of {result['repeat']} interleaved runs after {result['warmup']} warm-up "
        "runs; a ratio a / b > 1 means a is slower.",
    ]
    if result.get("channels_last"):
        lines.append(
            "  \nInputs, weights and output gradients in `torch.channels_last` for every "
            "implementation."
        )
    if result.get("first_call_s"):
        fc = result["first_call_s"]
        parts = [f"{k.replace('_', ' ')} {s:.1f} s" for k, s in fc.items()]
        lines.append(f"  \nFirst forward+backward call in a fresh process: {', '.join(parts)}.")
    has_tv = any("torchvision fwd" in r["ms"] for r in result["cases"])
    head = ["layer (N, C_in→C_out, H×W[, groups])"]
    for label in ("fwd", "fwd+bwd"):
        head += [f"conv2d {label}", f"deformconv {label}"]
        head += [f"torchvision {label}"] if has_tv else []
        head += [f"deformconv / conv2d {label}"]
        head += [f"torchvision / deformconv {label}"] if has_tv else []
    has_mem = any(r["peak_mib"] for r in result["cases"])
    if has_mem:
        head.append(
            "peak MiB fwd+bwd (conv2d / deformconv" + (" / torchvision)" if has_tv else ")")
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["cases"]:
        c, ms, ratio = r["case"], r["ms"], _ratios(r["ms"])
        groups = c.get("groups", 1)
        cells = [
            f"{c['name']} ({c['batch']}, {c['in_channels']}→{c['out_channels']}, "
            f"{c['size'][0]}×{c['size'][1]}" + (f", g={groups})" if groups > 1 else ")")
        ]
        for label in ("fwd", "fwd+bwd"):
            cells += [f"{ms[f'conv2d {label}']:.1f}", f"{ms[f'deformconv {label}']:.1f}"]
            cells += [f"{ms[f'torchvision {label}']:.1f}"] if has_tv else []
            cells += [f"{ratio[f'deformconv/conv2d {label}']:.2f}x"]
            cells += [f"{ratio[f'torchvision/deformconv {label}']:.1f}x"] if has_tv else []
        if has_mem:
            mem = [r["peak_mib"].get(i) for i in IMPLS if i in r["peak_mib"]]
            cells.append(" / ".join("?" if m is None else f"{m:.0f}" for m in mem))
        lines.append("| " + " | ".join(cells) + " |")
    gm = result["geomean"]
    if gm:
        cells = ["**geometric mean**"]
        for label in ("fwd", "fwd+bwd"):
            cells += ["", ""] + ([""] if has_tv else [])
            cells += [f"**{gm[f'deformconv/conv2d {label}']:.2f}x**"]
            cells += [f"**{gm[f'torchvision/deformconv {label}']:.1f}x**"] if has_tv else []
        cells += [""] if has_mem else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _model(name: str, deformable: bool) -> torch.nn.Module:
    import torchvision

    from deformconv import deformify

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    if deformable:
        deformify(model, last=3)
    return model


def _on_torchvision_op(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its deformable layers computing through torchvision's op.

    Each :class:`deformconv.DeformConv2d` keeps its parameters and offset head; only the
    deformable convolution itself is ``torchvision.ops.deform_conv2d``: the same model,
    run on the peer's kernel.
    """
    import torchvision.ops

    from deformconv import DeformConv2d

    for layer in model.modules():
        if isinstance(layer, DeformConv2d):

            def forward(input: torch.Tensor, m: DeformConv2d = layer) -> torch.Tensor:
                offset, mask = m.offset_and_mask(input)
                return torchvision.ops.deform_conv2d(
                    input, offset, m.weight, m.bias, m.stride, m.padding, m.dilation, mask
                )

            layer.forward = forward  # type: ignore[method-assign]
    return model


def run_models(
    names: Sequence[str] = ("resnet50", "resnext50_32x4d"),
    batch: int = 8,
    size: int = 224,
    threads: int = 2,
    repeat: int = 5,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Model-level rows: each torchvision model plain and with ``deformify(last=3)``.

    Times a training step (forward, sum of the logits, backward; no optimizer) and
    inference (``eval()``, ``no_grad``) on random ``(batch, 3, size, size)`` images for
    three variants taking turns in each round: ``plain``, ``deformable`` and
    ``torchvision`` (the same deformable model computing its deformable convolutions with
    ``torchvision.ops.deform_conv2d``). Needs torchvision. With ``channels_last``, the
    models and the images are in ``torch.channels_last``.

    Returns:
        ``{"batch", "size", "threads", "rows": [{"model", "ms": {...}}]}``; see
        :func:`models_to_markdown`.
    """
    torch.set_num_threads(threads)
    settle_allocator()
    say = progress or (lambda line: None)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    rows = []
    for name in names:
        models = {
            "plain": _model(name, False).to(memory_format=layout),
            "deformable": _model(name, True).to(memory_format=layout),
            "torchvision": _on_torchvision_op(_model(name, True)).to(memory_format=layout),
        }
        row: dict[str, Any] = {"model": name, "ms": {}}
        for label in ("train", "infer"):
            steps: dict[str, Callable[[], None]] = {}
            for variant, model in models.items():
                if label == "train":
                    model.train()

                    def step(m: torch.nn.Module = model) -> None:
                        m.zero_grad(set_to_none=True)
                        m(x).sum().backward()
                else:
                    model.eval()

                    def step(m: torch.nn.Module = model) -> None:
                        with torch.no_grad():
                            m(x)

                steps[variant] = step
            for variant, runs in _interleaved_ms(steps, repeat, warmup).items():
                row["ms"][f"{variant} {label}"] = statistics.median(runs)
                say(f"{name}: {variant} {label} {statistics.median(runs):.0f} ms")
        rows.append(row)
    return {
        "batch": batch, "size": size, "threads": threads, "repeat": repeat, "rows": rows,
        "channels_last": channels_last,
    }  # fmt: skip


def models_to_markdown(result: dict[str, Any]) -> str:
    """Model-level rows as a Markdown table (medians in ms)."""
    lines = [
        f"Batch {result['batch']} of {result['size']}×{result['size']} images, "
        f"{result['threads']} threads, median of {result['repeat']} interleaved runs; "
        "deformable = `deformify(model, last=3)`; on torchvision's op = the same deformable "
        "model computing with `torchvision.ops.deform_conv2d`."
        + (" Models and images in `torch.channels_last`." if result.get("channels_last") else ""),
        "",
        "| model | train step plain | deformable | ratio | on torchvision's op | "
        "torchvision / deformconv | inference plain | deformable | ratio | "
        "on torchvision's op | torchvision / deformconv |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        cells = [r["model"]]
        for label in ("train", "infer"):
            plain, deform = ms[f"plain {label}"], ms[f"deformable {label}"]
            peer = ms[f"torchvision {label}"]
            cells += [f"{plain:.0f}", f"{deform:.0f}", f"{deform / plain:.2f}x"]
            cells += [f"{peer:.0f}", f"{peer / deform:.1f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
