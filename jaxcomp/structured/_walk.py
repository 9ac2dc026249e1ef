"""The coupling rules of structured pruning: one rule per primitive, and the jaxpr walk.

See `jaxcomp.structured._labels` for what a label is. Each rule takes an equation and the labels
of its inputs, records ties and pins in the `State`, and returns the labels of its outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jex

from jaxcomp.structured._labels import (
    FIXED,
    FREE,
    ROLE_IN,
    ROLE_OUT,
    State,
    Tap,
    Value,
    fixed,
    free,
)

ELEMENTWISE = frozenset(
    """abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt ceil
    clamp clz complex conj convert_element_type copy copy_p cos cosh digamma div eq erf erf_inv erfc
    exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag integer_pow is_finite le lgamma log
    log1p logistic lt max min mul ne neg nextafter not or polygamma population_count pow real
    reduce_precision regularized_incomplete_beta rem round rsqrt select_n sharding_constraint
    shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient
    sub tan tanh xor zeta mulhi""".split()
)
REDUCTIONS = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor argmax argmin"
    .split()
)
CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
CALLS = frozenset(
    "pjit jit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
    "checkpoint remat remat2".split()
)
MULTI_IDENTITY = frozenset("optimization_barrier device_put".split())


Rule = Callable[[Any, list[Value], State], list[Value]]


def _out_shapes(eqn: Any) -> list[tuple[int, ...]]:
    return [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]


def _data(ins: Sequence[Value]) -> bool:
    return any(x.data for x in ins)


def _unknown(eqn: Any, ins: list[Value], st: State, why: str | None = None) -> list[Value]:
    reason = why or f"op '{eqn.primitive.name}' is not followed"
    for x in ins:
        for label in x.labels:
            st.pin(label, reason, warn=True)
    data = _data(ins)
    return [Value(tuple(fixed(n) for n in shape), data) for shape in _out_shapes(eqn)]


def _elementwise(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    shape = _out_shapes(eqn)[0]
    labels = []
    for d, n in enumerate(shape):
        cands = []
        for x in ins:
            if not x.labels:
                continue
            if len(x.labels) != len(shape):
                return _unknown(eqn, ins, st)
            if len(x.labels[d]) == n:
                cands.append(x.labels[d])
        labels.append(st.tie(cands, eqn.primitive.name) if cands else free(n))
    out = Value(tuple(labels), _data(ins))
    return [out] * len(eqn.outvars)


def _broadcast_in_dim(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    (x, *_), shape = ins, _out_shapes(eqn)[0]
    labels = [free(n) for n in shape]
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        if x.shape[i] == shape[d]:
            labels[d] = x.labels[i]
    return [Value(tuple(labels), ins[0].data)]


def _axis_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pairs runs of axes of shapes `a` and `b` (size-1 axes left out) with equal products."""
    ia = [i for i, n in enumerate(a) if n != 1]
    ib = [i for i, n in enumerate(b) if n != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) or j < len(ib):
        ga, gb = [], []
        pa = pb = 1
        while True:
            if pa <= pb and i < len(ia):
                ga.append(ia[i])
                pa *= a[ia[i]]
                i += 1
            elif j < len(ib):
                gb.append(ib[j])
                pb *= b[ib[j]]
                j += 1
            else:
                return None
            if pa == pb:
                break
        groups.append((ga, gb))
    return groups


def _explaining_axis(full: np.ndarray) -> tuple[int, np.ndarray] | None:
    """The one axis of `full` that its labels depend on, with the labels along it."""
    for k in range(full.ndim):
        line = np.moveaxis(full, k, 0).reshape(full.shape[k], -1)[:, 0]
        view = line.reshape([-1 if t == k else 1 for t in range(full.ndim)])
        if np.array_equal(full, np.broadcast_to(view, full.shape)):
            return k, line
    return None


def _reshape(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    labels = list(x.labels)
    if eqn.params.get("dimensions") is not None:
        labels = [labels[p] for p in eqn.params["dimensions"]]
    in_shape = tuple(len(lab) for lab in labels)
    shape = _out_shapes(eqn)[0]
    groups = _axis_groups(in_shape, shape)
    if groups is None:
        return _unknown(eqn, ins, st)
    out = [free(n) for n in shape]
    for ga, gb in groups:
        # The labels of every position of the run of axes: at most one channel id each.
        full = np.full([in_shape[a] for a in ga], FREE, np.int64)
        ids_here = np.zeros(full.shape, np.int64)
        for k, a in enumerate(ga):
            view = labels[a].reshape([-1 if t == k else 1 for t in range(len(ga))])
            full = np.maximum(full, view)
            ids_here = ids_here + (view >= 0)
        merges = bool((ids_here > 1).any())
        if merges:
            # `full` holds one id a position; every merged axis must be pinned, not just that one.
            for a in ga:
                st.pin(labels[a], "a reshape merges two channel axes", warn=True)
        full = full.reshape([shape[b] for b in gb])
        fill = FREE if (full == FREE).all() else FIXED
        found = _explaining_axis(full) if (full >= 0).any() and not merges else None
        if (full >= 0).any() and found is None and not merges:
            st.pin(full, "a reshape splits a channel axis (as GroupNorm or a head split do)",
                   warn=True)
        for k, b in enumerate(gb):
            out[b] = found[1] if found is not None and found[0] == k else np.full(shape[b], fill)
    return [Value(tuple(out), x.data)]


def _transpose(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    return [Value(tuple(x.labels[p] for p in eqn.params["permutation"]), x.data)]


def _squeeze(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    drop = {d % len(x.labels) for d in eqn.params["dimensions"]}
    return [Value(tuple(lab for d, lab in enumerate(x.labels) if d not in drop), x.data)]


def _concatenate(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    dim = eqn.params["dimension"]
    labels = []
    for d in range(len(ins[0].labels)):
        if d == dim:
            labels.append(np.concatenate([x.labels[d] for x in ins]))
        else:
            labels.append(st.tie([x.labels[d] for x in ins], "concatenate"))
    return [Value(tuple(labels), _data(ins))]


def _pin_axes(
    x: Value, axes: Sequence[int], st: State, reason: str, warn: bool
) -> list[np.ndarray]:
    labels = list(x.labels)
    for d in axes:
        st.pin(labels[d], reason, warn)
    return labels


def _pad(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    shape = _out_shapes(eqn)[0]
    labels = []
    for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        if (lo, hi, interior) == (0, 0, 0):
            labels.append(x.labels[d])
        else:
            st.pin(x.labels[d], "pad of a channel axis", warn=True)
            labels.append(fixed(shape[d]))
    return [Value(tuple(labels), _data(ins))]


def _slice(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    p = eqn.params
    strides = p.get("strides") or (1,) * len(x.labels)
    labels = []
    for d, lab in enumerate(x.labels):
        part = lab[p["start_indices"][d] : p["limit_indices"][d] : strides[d]]
        if len(part) != len(lab):
            st.pin(lab, "slice of a channel axis", warn=True)
        labels.append(part)
    return [Value(tuple(labels), x.data)]


def _dynamic_slice(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x, *idx = ins
    shape = _out_shapes(eqn)[0]
    labels = []
    for d, lab in enumerate(x.labels):
        if shape[d] == len(lab):
            labels.append(lab)
        else:
            st.pin(lab, "dynamic_slice of a channel axis", warn=True)
            labels.append(fixed(shape[d]))
    for i in idx:
        for lab in i.labels:
            st.pin(lab, "used as an index", warn=True)
    return [Value(tuple(labels), _data(ins))]


def _dynamic_update_slice(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x, upd, *idx = ins
    labels = []
    for d, lab in enumerate(x.labels):
        if len(upd.labels[d]) == len(lab):
            labels.append(st.tie([lab, upd.labels[d]], "dynamic_update_slice"))
        else:
            st.pin(lab, "dynamic_update_slice of a channel axis", warn=True)
            st.pin(upd.labels[d], "dynamic_update_slice of a channel axis", warn=True)
            labels.append(fixed(len(lab)))
    for i in idx:
        for lab in i.labels:
            st.pin(lab, "used as an index", warn=True)
    return [Value(tuple(labels), _data(ins))]


def _gather(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    operand, indices = ins[0], ins[1]
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    shape = _out_shapes(eqn)[0]
    labels = [fixed(n) for n in shape]
    dropped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [a for a in range(len(operand.labels)) if a not in dropped]
    for a, d in zip(kept, dn.offset_dims):
        if sizes[a] == len(operand.labels[a]) and shape[d] == sizes[a]:
            labels[d] = operand.labels[a]
        else:
            st.pin(operand.labels[a], "gather along a channel axis", warn=True)
    for a in dropped:
        st.pin(operand.labels[a], "gather along a channel axis", warn=True)
    for lab in indices.labels:
        st.pin(lab, "used as an index", warn=True)
    return [Value(tuple(labels), _data(ins))]


def _reduction(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    axes = {a % max(len(x.labels), 1) for a in eqn.params["axes"]}
    for a in axes:
        st.pin(x.labels[a], f"reduced over by '{eqn.primitive.name}'")
    labels = tuple(lab for d, lab in enumerate(x.labels) if d not in axes)
    return [Value(labels, x.data)] * len(eqn.outvars)


def _along_axis(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    """cumsum, sort, top_k and friends: the named axis is mixed, the others pass through."""
    name = eqn.primitive.name
    ndim = len(ins[0].labels)
    axis = eqn.params.get("axis", eqn.params.get("dimension", ndim - 1)) % ndim
    for x in ins:
        st.pin(x.labels[axis], f"mixed along the axis by '{name}'")
    labels = []
    for d in range(ndim):
        if d == axis:
            continue
        labels.append(st.tie([x.labels[d] for x in ins], name))
    outs = []
    for shape in _out_shapes(eqn):
        full = list(labels)
        full.insert(axis, fixed(shape[axis]))
        outs.append(Value(tuple(full), _data(ins)))
    return outs


def _reduce_window(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    p = eqn.params
    n_out = len(eqn.outvars)
    operands = ins[:n_out]
    shape = _out_shapes(eqn)[0]
    ndim = len(shape)
    pads = p.get("padding") or ((0, 0),) * ndim
    base = p.get("base_dilation") or (1,) * ndim
    wdil = p.get("window_dilation") or (1,) * ndim
    labels = []
    for d in range(ndim):
        trivial = (p["window_dimensions"][d], p["window_strides"][d], tuple(pads[d]), base[d],
                   wdil[d]) == (1, 1, (0, 0), 1, 1)
        if trivial:
            labels.append(st.tie([x.labels[d] for x in operands], eqn.primitive.name))
        else:
            for x in operands:
                st.pin(x.labels[d], "pooled over by a window")
            labels.append(fixed(shape[d]))
    return [Value(tuple(labels), _data(ins))] * n_out


def _tile(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    labels = []
    for lab, r in zip(x.labels, eqn.params["reps"]):
        if r != 1:
            st.pin(lab, "tile of a channel axis", warn=True)
        labels.append(np.tile(lab, r))
    return [Value(tuple(labels), x.data)]


def _split(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    axis = eqn.params["axis"]
    st.pin(x.labels[axis], "split of a channel axis", warn=True)
    outs, start = [], 0
    for size in eqn.params["sizes"]:
        labels = list(x.labels)
        labels[axis] = x.labels[axis][start : start + size]
        start += size
        outs.append(Value(tuple(labels), x.data))
    return outs


def _rev(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    x = ins[0]
    labels = _pin_axes(x, eqn.params["dimensions"], st, "rev of a channel axis", True)
    return [Value(tuple(labels), x.data)]


def _iota(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    return [Value(tuple(fixed(n) for n in shape), False) for shape in _out_shapes(eqn)]


def _multi_identity(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    return list(ins)


def _contract(st: State, a: Value, b: Value, pairs: Sequence[tuple[int, int]], name: str,
              a_var: Any, b_var: Any) -> None:
    """Ties the contracted axis pairs of a product; a product of two activations pins them."""
    both_data = a.data and b.data
    for i, j in pairs:
        if both_data:
            st.pin(a.labels[i], f"contracted between two activations in '{name}'")
            st.pin(b.labels[j], f"contracted between two activations in '{name}'")
            continue
        st.tie([a.labels[i], b.labels[j]], name)
        for x, var, axis in ((a, a_var, i), (b, b_var, j)):
            if not x.data:
                st.mark(x.labels[axis], ROLE_IN)
            elif st.taps is not None and (x.labels[axis] >= 0).any():
                st.taps.append(Tap(var, axis, x.labels[axis]))


def _dot_general(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    lhs, rhs = ins[:2]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    _contract(st, lhs, rhs, list(zip(lc, rc)), "dot_general", eqn.invars[0], eqn.invars[1])
    batch = [st.tie([lhs.labels[i], rhs.labels[j]], "dot_general") for i, j in zip(lb, rb)]
    free = []
    for x, used in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
        for d, lab in enumerate(x.labels):
            if d not in used:
                if not x.data:
                    st.mark(lab, ROLE_OUT)
                free.append(lab)
    return [Value(tuple(batch + free), _data(ins))]


def _conv(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    lhs, rhs = ins[:2]
    p = eqn.params
    if p["batch_group_count"] != 1:
        return _unknown(eqn, ins, st)
    lspec, rspec, ospec = p["dimension_numbers"]
    shape = _out_shapes(eqn)[0]
    for d in lspec[2:]:
        st.pin(lhs.labels[d], "spatial axis of a convolution")
    for d in rspec[2:]:
        st.pin(rhs.labels[d], "window of a convolution")
    groups = p["feature_group_count"]
    feat, rin, rout = lhs.labels[lspec[1]], rhs.labels[rspec[1]], rhs.labels[rspec[0]]
    if not rhs.data:
        # The kernel's own output axis produces the channels (marked before a grouped conv's
        # ties, which return whichever tied id is largest: for a depthwise conv, possibly one
        # of its input's producer).
        st.mark(rout, ROLE_OUT)
    if groups == 1:
        _contract(st, lhs, rhs, [(lspec[1], rspec[1])], "conv_general_dilated",
                  eqn.invars[0], eqn.invars[1])
    elif lhs.data and rhs.data:
        st.pin(feat, "grouped convolution of two activations")
        st.pin(rout, "grouped convolution of two activations")
    else:
        per_group = len(rout) // groups
        if len(rin) == 1:  # depthwise: input channel g feeds the outputs of group g only
            rout = st.tie([np.repeat(feat, per_group), rout], "conv_general_dilated")
        else:  # grouped: every group keeps the same in/out widths, so slots tie across groups
            st.tie([feat, np.tile(rin, groups)], "conv_general_dilated")
            rout = st.tie([rout, np.tile(rout[:per_group], groups)], "conv_general_dilated")
        if not rhs.data:
            st.mark(rin, ROLE_IN)
        elif st.taps is not None and (feat >= 0).any():
            st.taps.append(Tap(eqn.invars[0], lspec[1], feat))
    labels: list[np.ndarray] = [fixed(n) for n in shape]
    labels[ospec[0]] = lhs.labels[lspec[0]]
    labels[ospec[1]] = rout
    return [Value(tuple(labels), _data(ins))]


def _sub_jaxpr(eqn: Any) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return sub.jaxpr if isinstance(sub, jex.ClosedJaxpr) else sub
    return None


def _call(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    sub = _sub_jaxpr(eqn)
    if sub is None or len(sub.invars) != len(ins) or len(sub.outvars) != len(eqn.outvars):
        return _unknown(eqn, ins, st)
    return walk(sub, ins, st)


def _cond(eqn: Any, ins: list[Value], st: State) -> list[Value]:
    branches = [b.jaxpr for b in eqn.params["branches"]]
    results = [walk(b, ins[1:], st) for b in branches]
    outs = []
    for per_branch in zip(*results):
        labels = tuple(
            st.tie([v.labels[d] for v in per_branch], "cond")
            for d in range(len(per_branch[0].labels))
        )
        outs.append(Value(labels, _data(ins)))
    return outs


RULES: dict[str, Rule] = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "gather": _gather,
    "reduce_window_sum": _reduce_window,
    "reduce_window_max": _reduce_window,
    "reduce_window_min": _reduce_window,
    "reduce_window": _reduce_window,
    "tile": _tile,
    "split": _split,
    "rev": _rev,
    "iota": _iota,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "cond": _cond,
    "sort": _along_axis,
    "top_k": _along_axis,
    **{name: _along_axis for name in CUMULATIVE},
    **{name: _reduction for name in REDUCTIONS},
    **{name: _elementwise for name in ELEMENTWISE},
    **{name: _call for name in CALLS},
    **{name: _multi_identity for name in MULTI_IDENTITY},
}


def _literal(v: Any) -> Value:
    shape = tuple(getattr(v.aval, "shape", ()))
    return Value(tuple(fixed(n) for n in shape), False)


def walk(jaxpr: Any, ins: Sequence[Value], st: State) -> list[Value]:
    """Propagates labels through `jaxpr` (an open `Jaxpr`) from the labels of its inputs."""
    env: dict[Any, Value] = dict(zip(jaxpr.invars, ins))

    def read(v: Any) -> Value:
        if isinstance(v, jex.Literal) or v not in env:
            return _literal(v)
        return env[v]

    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        rule = RULES.get(eqn.primitive.name, _unknown)
        outs = rule(eqn, values, st)
        for v, out in zip(eqn.outvars, outs):
            env[v] = out
    return [read(v) for v in jaxpr.outvars]
