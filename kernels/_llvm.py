"""Four operations the CPU kernels need and numba cannot express, written as LLVM IR through numba intrinsics.

- `store_lanes(a, i, v)`: a[i : i + 4] = the four 16-bit lanes of v (uint64), one unaligned 8-byte store. The
  list kernels write a codeword's (up to) four positions at once, whatever its count, then advance by the count:
  no branch on how many non-zeros a word has (the record kernel's decode branches on it, and at batch 1 that
  decode is most of the record kernel's time: docs/kernels.md).
- `rowsum(xf, idx, n, B, c0, out, W)`: out[0:W] = sum over i < n of xf[idx[i] * B + c0 : ... + W], the W-wide
  sums kept in vector registers (U = 4 of them, so the adds do not wait on each other). W must be a compile-time
  literal (the caller's `numba.literally`): kernels specialize on it and numba's cache keys them by it. numba's loop
  vectorizer, given the same loop in Python, vectorizes over i with gathers instead (16 gathers per 8 positions at
  W = 16, measured 2x slower on the 2-core Xeon), and W scalar accumulators stay scalar.
- `rowsum_bf16(xu, idx, n, out)`: the same sums for 32 batch columns held as bf16 pairs: xu is uint32 [C * 16],
  lane k of a position holding column k's bf16 in its low half and column 16 + k's in its high half; out[0:32] float32
  (columns 0-15, then 16-31). A bf16 is the high half of a float32, so a shift and a mask give the two float32 vectors:
  one 64-byte load a position where float32 takes two.
- `prefetch(a, i)`: llvm.prefetch of a[i]'s cache line (the emit loop asks for the table lines of words ahead).
store_lanes and rowsum read and write only inside the arrays the caller sized for them (see kernels/cpu.py);
neither checks bounds. numba caches kernels/cpu.py's kernels keyed on cpu.py's own source: after editing this file,
touch cpu.py (or delete kernels/__pycache__) so they are compiled again.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I64 = ir.IntType(64)


@intrinsic
def store_lanes(typingctx, arr, idx, val):
    """arr (1-D uint16, C-contiguous)[idx : idx + 4] = val's 16-bit lanes, lowest first (little-endian)."""
    sig = types.void(arr, types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        a, i, v = args
        data = context.make_array(signature.args[0])(context, builder, a).data
        store = builder.store(v, builder.bitcast(builder.gep(data, [i]), _I64.as_pointer()))
        store.align = 2
        return context.get_dummy_value()

    return sig, codegen


U = 4  # rowsum's accumulators


def _sum_positions(builder, n, row, k: int, zero, name: str) -> list:
    """Emits the loop both rowsums share: k vectors, the sums over i < n of row(i) (a list of k vectors), U
    positions a step into U sets of accumulators (so the adds do not wait on each other), then the n % U left."""
    def add(a, b):
        return builder.fadd(a, b, flags=("fast",))

    fn, entry = builder.function, builder.basic_block
    head, body, merge, tail_head, tail_body, done = (
        fn.append_basic_block(f"{name}_{s}") for s in ("head", "body", "merge", "tail_head", "tail_body", "done"))
    builder.branch(head)
    builder.position_at_end(head)
    i = builder.phi(_I64)
    accs = [[builder.phi(zero.type) for _ in range(k)] for _ in range(U)]
    i.add_incoming(ir.Constant(_I64, 0), entry)
    for a in sum(accs, []):
        a.add_incoming(zero, entry)
    builder.cbranch(builder.icmp_unsigned("<=", builder.add(i, ir.Constant(_I64, U)), n), body, merge)
    builder.position_at_end(body)
    stepped = [[add(a, v) for a, v in zip(accs[u], row(builder.add(i, ir.Constant(_I64, u))))] for u in range(U)]
    i.add_incoming(builder.add(i, ir.Constant(_I64, U)), body)
    for a, v in zip(sum(accs, []), sum(stepped, [])):
        a.add_incoming(v, body)
    builder.branch(head)
    builder.position_at_end(merge)
    totals = accs[0]
    for u in range(1, U):
        totals = [add(t, a) for t, a in zip(totals, accs[u])]
    builder.branch(tail_head)
    builder.position_at_end(tail_head)
    j = builder.phi(_I64)
    tail = [builder.phi(zero.type) for _ in range(k)]
    j.add_incoming(i, merge)
    for a, t in zip(tail, totals):
        a.add_incoming(t, merge)
    builder.cbranch(builder.icmp_unsigned("<", j, n), tail_body, done)
    builder.position_at_end(tail_body)
    j.add_incoming(builder.add(j, ir.Constant(_I64, 1)), tail_body)
    for a, v in zip(tail, row(j)):
        a.add_incoming(add(a, v), tail_body)
    builder.branch(tail_head)
    builder.position_at_end(done)
    return tail


@intrinsic
def rowsum(typingctx, xf, idx, n, B, c0, out, width):
    """See the module's docstring."""
    if not isinstance(width, types.IntegerLiteral):
        return None  # numba asks again with the literal (the caller wraps W in numba.literally)
    W = width.literal_value
    sig = types.void(xf, idx, types.uint64, types.uint64, types.uint64, out, width)

    def codegen(context, builder, signature, args):
        xs, ids, outs = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 1, 5))
        n, B, c0 = args[2], args[3], args[4]
        vec = ir.VectorType(ir.FloatType(), W)

        def row(i):  # xf[idx[i] * B + c0 : + W] as one vector load
            j = builder.zext(builder.load(builder.gep(ids, [i])), _I64)
            load = builder.load(builder.bitcast(builder.gep(xs, [builder.add(builder.mul(j, B), c0)]),
                                                vec.as_pointer()))
            load.align = 4
            return [load]

        acc, = _sum_positions(builder, n, row, 1, ir.Constant(vec, [0.0] * W), "rowsum")
        store = builder.store(acc, builder.bitcast(outs, vec.as_pointer()))
        store.align = 4
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def rowsum_bf16(typingctx, xu, idx, n, out):
    """See the module's docstring."""
    sig = types.void(xu, idx, types.uint64, out)

    def codegen(context, builder, signature, args):
        xs, ids, outs = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 1, 3))
        vi, vf = ir.VectorType(ir.IntType(32), 16), ir.VectorType(ir.FloatType(), 16)
        shift, mask = ir.Constant(vi, [16] * 16), ir.Constant(vi, [-65536] * 16)

        def row(i):  # position idx[i]'s 16 lanes as (columns 0-15, columns 16-31) float32
            j = builder.zext(builder.load(builder.gep(ids, [i])), _I64)
            load = builder.load(builder.bitcast(builder.gep(xs, [builder.mul(j, ir.Constant(_I64, 16))]),
                                                vi.as_pointer()))
            load.align = 4
            return [builder.bitcast(builder.shl(load, shift), vf), builder.bitcast(builder.and_(load, mask), vf)]

        accs = _sum_positions(builder, args[2], row, 2, ir.Constant(vf, [0.0] * 16), "rowsum_bf16")
        for half, acc in zip((0, 16), accs):
            store = builder.store(acc, builder.bitcast(builder.gep(outs, [ir.Constant(_I64, half)]), vf.as_pointer()))
            store.align = 4
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, idx):
    """A hint to load the cache line of arr[idx] (1-D, C-contiguous) into L1; never faults, whatever idx."""
    sig = types.void(arr, types.uint64)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(),
                                                                                   [i8p, i32, i32, i32]))
        ptr = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
