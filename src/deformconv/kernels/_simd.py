"""Explicit 8-lane vectors for Numba kernels: an LLVM ``<8 x float>`` value and its ops.

Numba runs LLVM without its SLP vectoriser, and the loop vectoriser leaves a
floating-point reduction scalar unless fastmath allows reordering it. Kernels that
reduce over channels therefore spell their vectors out with these intrinsics: plain
vector loads, stores, multiplies, adds and shuffles, emitted in the order written, with
no FMA contraction, so results are bitwise reproducible.

``Vec`` is the Numba type of such a value; the lane type follows the array's dtype
(float32 or float64).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

__all__ = ["LANES", "Vec", "vload", "vmul", "vmuladd", "vsplat", "vstore", "vsum4"]

#: Lanes of a vector (one AVX register of float32).
LANES = 8


class Vec(types.Type):
    """Eight lanes of ``dtype`` held in one LLVM vector value (``<8 x float>``)."""

    def __init__(self, dtype: types.Type) -> None:
        self.dtype = dtype
        super().__init__(name=f"Vec{LANES}[{dtype}]")


@register_model(Vec)
class VecModel(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Vec) -> None:
        lane = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(lane, LANES))


def lanes_pointer(context: Any, builder: Any, aty: Any, a: Any, r: Any, c: Any) -> Any:
    arr = context.make_array(aty)(context, builder, a)
    shape = cgutils.unpack_tuple(builder, arr.shape, aty.ndim)
    strides = cgutils.unpack_tuple(builder, arr.strides, aty.ndim)
    return cgutils.get_item_pointer2(context, builder, arr.data, shape, strides, aty.layout, [r, c])


@intrinsic
def vload(typingctx: Any, a: Any, r: Any, c: Any) -> Any:
    """``a[r, c : c + 8]`` as a vector (the caller keeps ``c + 8`` within the row)."""
    sig = Vec(a.dtype)(a, r, c)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vty = context.get_value_type(sig.return_type)
        ptr = lanes_pointer(context, builder, sig.args[0], *args)
        align = context.get_abi_sizeof(context.get_value_type(a.dtype))
        return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=align)

    return sig, codegen


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


@intrinsic
def vsplat(typingctx: Any, s: Any) -> Any:
    """A vector with ``s`` in every lane."""
    sig = Vec(s)(s)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        vty = context.get_value_type(sig.return_type)
        i32 = ir.IntType(32)
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], i32(0))
        zeros = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), zeros)

    return sig, codegen


@intrinsic
def vmul(typingctx: Any, u: Any, v: Any) -> Any:
    """Lane-wise ``u·v``."""
    sig = u(u, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fmul(args[0], args[1])

    return sig, codegen


@intrinsic
def vmuladd(typingctx: Any, acc: Any, u: Any, v: Any) -> Any:
    """Lane-wise ``acc + u·v``: a multiply, then an add (no contraction, as in scalars)."""
    sig = acc(acc, u, v)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fadd(args[0], builder.fmul(args[1], args[2]))

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
