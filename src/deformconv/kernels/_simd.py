"""Explicit 8-lane vectors for Numba kernels: an LLVM ``<8 x float>`` value and its ops.

Numba runs LLVM without its SLP vectoriser, and the loop vectoriser leaves a
floating-point reduction scalar unless fastmath allows reordering it. Kernels that
reduce over channels therefore spell their vectors out with these intrinsics: plain
vector loads, stores, multiplies, adds and shuffles, emitted in the order written, with
no FMA contraction, so results are bitwise reproducible.

``Vec`` is the Numba type of such a value; the lane type follows the array's dtype
(float32 or float64). ``vsplatw`` makes a wide vector of :data:`WIDE` lanes (16 where
Numba compiles for AVX-512: one ``zmm`` register), which the same arithmetic intrinsics
accept; ``vloadas``, ``vsplatas`` and ``vwidth`` take their width from a given vector's
type, so one loop body serves either width; ``vfold`` adds a wide vector's halves into an
8-lane one.
"""

from __future__ import annotations

from typing import Any

import numba
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

__all__ = [
    "LANES", "WIDE", "Vec", "vadd", "vfloor", "vfold", "vge", "vload", "vload2", "vloadas",
    "vlt", "vmax", "vmin", "vmul", "vmuladd", "vselect", "vsplat", "vsplatas",
    "vsplatw", "vstore", "vstore2", "vsub", "vsum4", "vsum8", "vwidth",
]  # fmt: skip

#: Lanes of a vector (one AVX register of float32).
LANES = 8


def _compiles_for_avx512() -> bool:
    """Whether Numba compiles for a CPU with AVX-512 (its target features, or the host's)."""
    features = getattr(numba.config, "CPU_FEATURES", None)  # NUMBA_CPU_FEATURES or None
    if features is None:
        features = llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


#: Lanes of a wide vector: 16 (one AVX-512 register of float32) where Numba compiles for
#: AVX-512, else :data:`LANES`; kernels take wide steps where a loop's length allows.
WIDE = 16 if _compiles_for_avx512() else LANES


class Vec(types.Type):
    """``lanes`` lanes of ``dtype`` held in one LLVM vector value (``<8 x float>``)."""

    def __init__(self, dtype: types.Type, lanes: int = LANES) -> None:
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vec{lanes}[{dtype}]")


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Vec) -> None:
        lane = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(lane, fe_type.lanes))


def lanes_pointer(context: Any, builder: Any, aty: Any, a: Any, r: Any, c: Any) -> Any:
    arr = context.make_array(aty)(context, builder, a)
    shape = cgutils.unpack_tuple(builder, arr.shape, aty.ndim)
    strides = cgutils.unpack_tuple(builder, arr.strides, aty.ndim)
    return cgutils.get_item_pointer2(context, builder, arr.data, shape, strides, aty.layout, [r, c])


def _loader(lanes: int) -> Any:
    def typer(typingctx: Any, a: Any, r: Any, c: Any) -> Any:
        sig = Vec(a.dtype, lanes)(a, r, c)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            vty = context.get_value_type(sig.return_type)
            ptr = lanes_pointer(context, builder, sig.args[0], *args)
            align = context.get_abi_sizeof(context.get_value_type(a.dtype))
            return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=align)

        return sig, codegen

    return typer


vload = intrinsic(_loader(LANES))
vload.__doc__ = "``a[r, c : c + 8]`` as a vector (the caller keeps ``c + 8`` within the row)."


@intrinsic
def vloadas(typingctx: Any, a: Any, r: Any, c: Any, like: Any) -> Any:
    """``a[r, c : c + n]`` as a vector of ``like``'s width n (one loop body, either width)."""
    sig, codegen = _loader(like.lanes)(typingctx, a, r, c)
    return sig.return_type(a, r, c, like), lambda cx, b, sg, args: codegen(cx, b, sg, args[:3])


@intrinsic
def vstore(typingctx: Any, a: Any, r: Any, c: Any, v: Any) -> Any:
    """``a[r, c : c + 8] = v``."""
    sig = types.none(a, r, c, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = lanes_pointer(context, builder, sig.args[0], *args[:3])
        align = context.get_abi_sizeof(context.get_value_type(a.dtype))
        builder.store(args[3], builder.bitcast(ptr, args[3].type.as_pointer()), align=align)
        return context.get_dummy_value()

    return sig, codegen


def _splatter(lanes: int) -> Any:
    def typer(typingctx: Any, s: Any) -> Any:
        sig = Vec(s, lanes)(s)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            vty = context.get_value_type(sig.return_type)
            i32 = ir.IntType(32)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], i32(0))
            zeros = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

        return sig, codegen

    return typer


vsplat = intrinsic(_splatter(LANES))
vsplat.__doc__ = "A vector with ``s`` in every lane."
vsplatw = intrinsic(_splatter(WIDE))
vsplatw.__doc__ = "A wide vector with ``s`` in every lane."


@intrinsic
def vwidth(typingctx: Any, v: Any) -> Any:
    """The lanes of ``v``'s vector type, as an unsigned constant (a loop's step)."""
    sig = types.uint64(v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return context.get_constant(types.uint64, v.lanes)

    return sig, codegen


@intrinsic
def vsplatas(typingctx: Any, s: Any, like: Any) -> Any:
    """A vector of ``like``'s width with ``s`` in every lane."""
    sig, codegen = _splatter(like.lanes)(typingctx, s)
    return sig.return_type(s, like), lambda cx, b, sg, args: codegen(cx, b, sg, args[:1])


@intrinsic
def vfold(typingctx: Any, v: Any) -> Any:
    """A wide vector's two halves added lane-wise: ``v[:8] + v[8:]`` (itself when 8 wide)."""
    sig = Vec(v.dtype)(v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        if v.lanes == LANES:
            return args[0]
        i32 = ir.IntType(32)
        undef = ir.Constant(args[0].type, ir.Undefined)

        def half(first: int) -> Any:
            lanes = ir.Constant(ir.VectorType(i32, LANES), list(range(first, first + LANES)))
            return builder.shuffle_vector(args[0], undef, lanes)

        return builder.fadd(half(0), half(LANES))

    return sig, codegen


@intrinsic
def vmuladd(typingctx: Any, acc: Any, u: Any, v: Any) -> Any:
    """Lane-wise ``acc + u·v``: a multiply, then an add (no contraction, as in scalars)."""
    sig = acc(acc, u, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fadd(args[0], builder.fmul(args[1], args[2]))

    return sig, codegen


def _lanewise(instruction: str) -> Any:
    """Typer of an intrinsic applying ``builder.<instruction>`` (fadd, fsub, fmul) lane-wise."""

    def typer(typingctx: Any, u: Any, v: Any) -> Any:
        sig = u(u, v)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return getattr(builder, instruction)(args[0], args[1])

        return sig, codegen

    return typer


vmul = intrinsic(_lanewise("fmul"))
vmul.__doc__ = "Lane-wise ``u·v``."
vadd = intrinsic(_lanewise("fadd"))
vadd.__doc__ = "Lane-wise ``u + v``."
vsub = intrinsic(_lanewise("fsub"))
vsub.__doc__ = "Lane-wise ``u - v``."


@intrinsic
def vfloor(typingctx: Any, v: Any) -> Any:
    """Lane-wise ``floor(v)`` (one rounding instruction)."""
    sig = v(v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vty = args[0].type
        suffix = f"v{LANES}f{vty.element.intrinsic_name[1:]}"  # llvm.floor.v8f32
        fnty = ir.FunctionType(vty, [vty])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.floor.{suffix}")
        return builder.call(fn, [args[0]])

    return sig, codegen


def _compare(op: str) -> Any:
    def typer(typingctx: Any, u: Any, v: Any) -> Any:
        sig = u(u, v)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.uitofp(builder.fcmp_ordered(op, args[0], args[1]), args[0].type)

        return sig, codegen

    return typer


vge = intrinsic(_compare(">="))
vge.__doc__ = "Lane-wise ``1.0 if u >= v else 0.0`` (0.0 where a lane is NaN)."
vlt = intrinsic(_compare("<"))
vlt.__doc__ = "Lane-wise ``1.0 if u < v else 0.0`` (0.0 where a lane is NaN)."


def _pick(op: str) -> Any:
    def typer(typingctx: Any, u: Any, v: Any) -> Any:
        sig = u(u, v)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.select(builder.fcmp_ordered(op, args[0], args[1]), args[0], args[1])

        return sig, codegen

    return typer


vmin = intrinsic(_pick("<"))
vmin.__doc__ = "Lane-wise ``u if u < v else v`` (for lanes that are not NaN)."
vmax = intrinsic(_pick(">"))
vmax.__doc__ = "Lane-wise ``u if u > v else v`` (for lanes that are not NaN)."


@intrinsic
def vselect(typingctx: Any, cond: Any, u: Any, v: Any) -> Any:
    """Lane-wise ``u if cond != 0 else v``: a select (the other side's NaNs stay out)."""
    sig = u(cond, u, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        nonzero = builder.fcmp_unordered("!=", args[0], ir.Constant(args[0].type, None))
        return builder.select(nonzero, args[1], args[2])

    return sig, codegen


@intrinsic
def vload2(typingctx: Any, a: Any, r: Any, c: Any) -> Any:
    """``a[r, c : c + 16]`` split into its even and odd elements (two vectors)."""
    sig = types.UniTuple(Vec(a.dtype), 2)(a, r, c)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        lane = context.get_value_type(a.dtype)
        wide = ir.VectorType(lane, 2 * LANES)
        ptr = lanes_pointer(context, builder, sig.args[0], *args)
        align = context.get_abi_sizeof(lane)
        both = builder.load(builder.bitcast(ptr, wide.as_pointer()), align=align)
        i32 = ir.IntType(32)
        even = ir.Constant(ir.VectorType(i32, LANES), list(range(0, 2 * LANES, 2)))
        odd = ir.Constant(ir.VectorType(i32, LANES), list(range(1, 2 * LANES, 2)))
        items = [builder.shuffle_vector(both, both, even), builder.shuffle_vector(both, both, odd)]
        return context.make_tuple(builder, sig.return_type, items)

    return sig, codegen


@intrinsic
def vsum4(typingctx: Any, v0: Any, v1: Any, v2: Any, v3: Any) -> Any:
    """The lane sums of four vectors, by lane shuffles.

    Each sum runs in the same fixed tree ``((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))``.
    """
    sig = types.UniTuple(v0.dtype, 4)(v0, v1, v2, v3)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)

        def pick(a: Any, b: Any, lanes: list[int]) -> Any:
            mask = ir.Constant(ir.VectorType(i32, len(lanes)), lanes)
            return builder.shuffle_vector(a, b, mask)

        # halves: h[i] = l[i] + l[i + 4]
        h = [builder.fadd(pick(v, v, [0, 1, 2, 3]), pick(v, v, [4, 5, 6, 7])) for v in args]
        # pairs: (h0[0] + h0[2], h0[1] + h0[3], h1[0] + h1[2], h1[1] + h1[3])
        t01 = builder.fadd(pick(h[0], h[1], [0, 1, 4, 5]), pick(h[0], h[1], [2, 3, 6, 7]))
        t23 = builder.fadd(pick(h[2], h[3], [0, 1, 4, 5]), pick(h[2], h[3], [2, 3, 6, 7]))
        s = builder.fadd(pick(t01, t23, [0, 2, 4, 6]), pick(t01, t23, [1, 3, 5, 7]))
        items = [builder.extract_element(s, i32(i)) for i in range(4)]
        return context.make_tuple(builder, sig.return_type, items)

    return sig, codegen


@intrinsic
def vsum8(typingctx: Any, a: Any, r: Any) -> Any:
    """The lane sums of the eight vectors ``a[r + i, 0:8]`` (i < 8), as one vector.

    Each sum runs in :func:`vsum4`'s tree ``((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))``.
    """
    sig = Vec(a.dtype)(a, r)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        vty = context.get_value_type(sig.return_type)
        align = context.get_abi_sizeof(context.get_value_type(a.dtype))
        zero = context.get_constant(sig.args[1], 0)
        v = []
        for i in range(LANES):
            row = builder.add(args[1], context.get_constant(sig.args[1], i))
            ptr = lanes_pointer(context, builder, sig.args[0], args[0], row, zero)
            v.append(builder.load(builder.bitcast(ptr, vty.as_pointer()), align=align))

        def pick(x: Any, y: Any, lanes: list[int]) -> Any:
            mask = ir.Constant(ir.VectorType(i32, len(lanes)), lanes)
            return builder.shuffle_vector(x, y, mask)

        # Halves, pairing vectors i and i + 4: z[i] = (h_i | h_{i+4}), h = lo + hi.
        z = [
            builder.fadd(pick(v[i], v[i + 4], [0, 1, 2, 3, 8, 9, 10, 11]),
                         pick(v[i], v[i + 4], [4, 5, 6, 7, 12, 13, 14, 15]))
            for i in range(4)
        ]  # fmt: skip
        # Within each 128-bit half: (h0 + h2, h1 + h3) of two vectors side by side.
        t = [
            builder.fadd(pick(z[i], z[i + 1], [0, 1, 8, 9, 4, 5, 12, 13]),
                         pick(z[i], z[i + 1], [2, 3, 10, 11, 6, 7, 14, 15]))
            for i in (0, 2)
        ]  # fmt: skip
        # Even plus odd: vector i's sum lands in lane i.
        return builder.fadd(pick(t[0], t[1], [0, 2, 8, 10, 4, 6, 12, 14]),
                            pick(t[0], t[1], [1, 3, 9, 11, 5, 7, 13, 15]))  # fmt: skip

    return sig, codegen


@intrinsic
def vstore2(typingctx: Any, a: Any, r: Any, c: Any, u: Any, v: Any) -> Any:
    """``a[r, c : c + 16] = (u0, v0, u1, v1, ...)``, the lanes of two vectors interleaved."""
    sig = types.none(a, r, c, u, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        lanes = [k for i in range(LANES) for k in (i, i + LANES)]
        both = builder.shuffle_vector(
            args[3], args[4], ir.Constant(ir.VectorType(i32, 2 * LANES), lanes)
        )
        ptr = lanes_pointer(context, builder, sig.args[0], *args[:3])
        align = context.get_abi_sizeof(context.get_value_type(a.dtype))
        builder.store(both, builder.bitcast(ptr, both.type.as_pointer()), align=align)
        return context.get_dummy_value()

    return sig, codegen
