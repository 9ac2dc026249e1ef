"""FLOPs of a function, in total and per parameter leaf, read from its jaxpr.

FLOPs are counted as 2 x the multiply-accumulates of `dot_general` and `conv_general_dilated`
(the convention of Torch-Pruning, fvcore and NNI counters, which count MACs and leave elementwise
work out; a transposed convolution counts its inputs times the window, not the zeros it inserts).
The body of a `while_loop` (unknown trip count) is counted once; `scan` and `fori_loop` with
static bounds count every iteration.

Each matmul or convolution is attributed to the parameter leaf its weight operand comes from,
followed through casts, reshapes, transposes, elementwise arithmetic, nested `jit` calls and
custom-derivative calls, so a compressed leaf that is materialized inside the forward pass, or
applied as a sequence of small factors, is charged to its own path. Rebuilding a dense kernel
from its factors inside the forward pass is a real matmul on every call and is counted as one
(serve factorized kernels with `jaxcomp.nn.decompose.intercept_factorized` to run the factors).
A product of two activations (attention scores) has no parameter path and counts under
`"(activations)"`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.extend import core as jex

from jaxcomp.core import is_compressed
from jaxcomp.tree import leaves_with_paths

__all__ = ["FlopCount", "count_flops", "ACTIVATIONS"]

ACTIVATIONS = "(activations)"


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call: `total`, and `per_path` keyed by parameter path (plus `"(activations)"`).

    `conv_positions` holds, for each kernel path that a convolution uses directly as its weight,
    `(input positions, output positions)` summed over its calls (batch x spatial size, times a
    scan's length): the FLOPs of a factorized convolution depend on both (see
    `jaxcomp.decompose.FlopBudget`).
    """

    total: int
    per_path: Mapping[str, int]
    conv_positions: Mapping[str, tuple[int, int]] = dataclasses.field(default_factory=dict,
                                                                      compare=False)

    def __getitem__(self, path: str) -> int:
        return self.per_path.get(path, 0)


@dataclasses.dataclass(frozen=True)
class _Origin:
    """What a jaxpr variable depends on: parameter paths, and whether it depends on the inputs."""

    paths: frozenset[str] = frozenset()
    data: bool = False

    def __or__(self, other: _Origin) -> _Origin:
        # Activations need no paths: only weight-only values carry them (keeps unions small).
        if self.data or other.data:
            return _DATA
        return _Origin(self.paths | other.paths)


_NONE = _Origin()
_DATA = _Origin(data=True)


def _dot_flops(eqn: Any) -> int:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _made_by_conv_transpose(eqn: Any) -> bool | None:
    """Whether `lax.conv_transpose` (behind Flax's `ConvTranspose`) built this convolution;
    `None` when the equation carries no traceback to tell."""
    traceback = getattr(eqn.source_info, "traceback", None)
    if traceback is None:
        return None
    return any(frame.function_name == "conv_transpose" for frame in traceback.frames)


def _conv_flops(eqn: Any, flipped_kernel: bool = False) -> int:
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    kernel = [rhs.shape[d] for d in rhs_spec[2:]]
    rhs_dilation = eqn.params.get("rhs_dilation") or (1,) * len(kernel)
    padding = eqn.params.get("padding")
    # A stride-1 transposed convolution has no inserted zeros but pads every side by the whole
    # window ("full" convolution): the padding zeros are not multiplied either. So does the
    # input gradient of a convolution (its kernel is flipped with `rev`). An ordinary
    # convolution that the user padded that much multiplies its padding like any other.
    full = (not isinstance(padding, str) and padding is not None and len(padding) == len(kernel)
            and all(s == 1 for s in eqn.params.get("window_strides") or ())
            and any(k > 1 for k in kernel)
            and all(lo >= (k - 1) * r and hi >= (k - 1) * r
                    for (lo, hi), k, r in zip(padding, kernel, rhs_dilation)))
    if full and not flipped_kernel:
        full = _made_by_conv_transpose(eqn) is not False
    if full or any(d > 1 for d in eqn.params.get("lhs_dilation") or ()):
        # A transposed convolution: the zeros inserted between inputs are not multiplied (the
        # fvcore convention): every input element meets the whole window, for each output
        # feature of its group.
        out_spec = dn.out_spec
        spatial_in = math.prod(lhs.shape[d] for d in dn.lhs_spec[2:])
        positions = lhs.shape[dn.lhs_spec[0]] * spatial_in * out.shape[out_spec[1]]
        return 2 * positions * window * rhs.shape[rhs_spec[1]]
    return 2 * math.prod(out.shape) * window * rhs.shape[rhs_spec[1]]


class _Counts(dict):
    """FLOPs per path, and the input and output positions of each convolution kernel path."""

    def __init__(self):
        super().__init__()
        self.conv_positions: dict[str, tuple[int, int]] = {}

    def record_conv(self, eqn: Any, kernel: _Origin, scale: int) -> None:
        if kernel.data or len(kernel.paths) != 1:
            return
        (path,) = kernel.paths
        lhs, out = eqn.invars[0].aval, eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        positions = (scale * math.prod(lhs.shape) // max(lhs.shape[dn.lhs_spec[1]], 1),
                     scale * math.prod(out.shape) // max(out.shape[dn.out_spec[1]], 1))
        old = self.conv_positions.get(path, (0, 0))
        self.conv_positions[path] = (old[0] + positions[0], old[1] + positions[1])

    def add_positions(self, other: _Counts) -> None:
        """Adds the positions of a part counted on its own (the branch of a cond that counts)."""
        for path, (n_in, n_out) in other.conv_positions.items():
            old = self.conv_positions.get(path, (0, 0))
            self.conv_positions[path] = (old[0] + n_in, old[1] + n_out)


def _charge(counts: dict[str, int], origins: list[_Origin], flops: int) -> None:
    weights = [o for o in origins if o.paths and not o.data]
    paths = sorted(set().union(*(o.paths for o in weights))) if weights else [ACTIVATIONS]
    # A product of several weight leaves (e.g. U @ V of a factorization) is shared equally.
    share, rest = divmod(flops, len(paths))
    for i, path in enumerate(paths):
        counts[path] = counts.get(path, 0) + share + (1 if i < rest else 0)


def _walk(jaxpr: Any, origins: list[_Origin], counts: _Counts, scale: int) -> list[_Origin]:
    env: dict[Any, _Origin] = dict(zip(jaxpr.invars, origins))

    def read(v: Any) -> _Origin:
        return _NONE if isinstance(v, jex.Literal) else env.get(v, _NONE)

    flipped: set[Any] = set()  # outputs of `rev`: kernels flipped by a convolution's transpose
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "dot_general":
            _charge(counts, ins, scale * _dot_flops(eqn))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1]
            flops = _conv_flops(eqn, flipped_kernel=not isinstance(rhs, jex.Literal) and rhs in flipped)
            _charge(counts, ins, scale * flops)
            counts.record_conv(eqn, ins[1], scale)
        elif name == "rev":
            flipped.update(eqn.outvars)
        subs = list(jex.jaxprs_in_params(eqn.params))
        if subs:
            outs = _walk_sub(eqn, subs, ins, counts, scale)
        else:
            merged = _NONE
            for o in ins:
                merged = merged | o
            outs = [merged] * len(eqn.outvars)
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _settle(body: Any, consts: list[_Origin], carry: list[_Origin], rest: list[_Origin],
            scale: int) -> list[_Origin]:
    """Origins of a loop's carry: the union of where each starts and what the body (walked
    uncounted, inputs `consts + carry + rest`) makes of it, iterated to a fixed point."""
    for _ in range(len(carry) + 1):
        outs = _walk(body, consts + carry + rest, _Counts(), scale)
        new = [a | b for a, b in zip(carry, outs[:len(carry)])]
        if new == carry:
            break
        carry = new
    return carry


def _walk_sub(
    eqn: Any, subs: list[Any], ins: list[_Origin], counts: _Counts, scale: int
) -> list[_Origin]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if name == "scan":
        # The carry takes the union of its start and what the body makes of it (a fixed point,
        # found uncounted, as for while): a carry that starts from a parameter (a learned
        # initial state) is state, not a weight, from the second step on.
        inner = eqn.params["jaxpr"].jaxpr
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        consts, xs = ins[:n_consts], ins[n_consts + n_carry:]
        carry = _settle(inner, consts, ins[n_consts:n_consts + n_carry], xs, scale)
        outs = _walk(inner, consts + carry + xs, counts, scale * int(eqn.params["length"]))
        return (carry + outs[n_carry:])[:n_out]
    if name == "cond":
        # Count the most expensive branch; outputs may come from any branch.
        best: _Counts | None = None
        merged_outs = [_NONE] * n_out
        for branch in subs:
            branch_counts = _Counts()
            outs = _walk(branch, ins[1:], branch_counts, scale)
            merged_outs = [a | b for a, b in zip(merged_outs, outs)]
            if best is None or sum(branch_counts.values()) > sum(best.values()):
                best = branch_counts
        for path, flops in (best or {}).items():
            counts[path] = counts.get(path, 0) + flops
        if best is not None:  # the positions of the branch whose FLOPs count, added to the rest
            counts.add_positions(best)
        return merged_outs
    if len(subs) == 1 and len(subs[0].invars) == len(ins) and len(subs[0].outvars) == n_out:
        return _walk(subs[0], ins, counts, scale)
    if name == "custom_vjp_call" or name.startswith("custom_"):
        first = subs[0]
        if len(first.invars) == len(ins):
            outs = _walk(first, ins, counts, scale)
            if len(outs) == n_out:
                return outs
    if name == "while":
        # The trip count is not known from the jaxpr: the body is counted once. Loop-carried
        # values take the union of what the body makes of them (a fixed point, found uncounted).
        cond_n, body_n = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        body = eqn.params["body_jaxpr"].jaxpr
        consts = ins[cond_n:cond_n + body_n]
        carry = _settle(body, consts, ins[cond_n + body_n:], [], scale)
        _walk(body, consts + carry, counts, scale)
        return carry
    # Unknown structure: count each body once, treat everything as mixed.
    merged = _NONE
    for o in ins:
        merged = merged | o
    for sub in subs:
        _walk(sub, [merged] * len(sub.invars), counts, scale)
    return [merged] * n_out


def count_flops(fn: Callable[..., Any], params: Any, *inputs: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of `fn(params, *inputs, **kwargs)`, in total and per parameter leaf path.

    The function is traced with `jax.make_jaxpr` (nothing runs); abstract inputs
    (`jax.ShapeDtypeStruct`) are fine. Compressed leaves in `params` are charged as one path.

    Args:
      fn: e.g. `lambda p, x: model.apply({"params": p}, x)`.
      params: the parameter tree whose leaves FLOPs are attributed to.
      *inputs: the other positional arguments (batch of inputs, ...).
      **kwargs: static keyword arguments passed through to `fn`.

    Returns:
      A `FlopCount`; `count.per_path["Dense_0/kernel"]` or `count["Dense_0/kernel"]`.

    Example:
        >>> params = {"w": jnp.ones((4, 3))}
        >>> count_flops(lambda p, x: x @ p["w"], params, jnp.ones((2, 4))).per_path
        {'w': 48}
    """
    if not callable(fn):
        raise ValueError(f"count_flops: fn must be a function (params, *inputs) -> outputs, got {fn!r}")
    closed = jax.make_jaxpr(lambda p, *a: fn(p, *a, **kwargs))(params, *inputs)
    origins: list[_Origin] = []
    for path, leaf in leaves_with_paths(params):
        n = len(jax.tree.leaves(leaf)) if is_compressed(leaf) else 1
        origins.extend([_Origin(frozenset([path]))] * n)
    origins.extend([_DATA] * len(jax.tree.leaves(inputs)))
    if len(origins) != len(closed.jaxpr.invars):
        raise ValueError(
            f"count_flops: {len(closed.jaxpr.invars)} traced inputs but {len(origins)} leaves in "
            "params and inputs; pass params without None placeholders"
        )
    counts = _Counts()
    _walk(closed.jaxpr, origins, counts, 1)
    ordered = {path: counts[path] for path, _ in leaves_with_paths(params) if path in counts}
    if ACTIVATIONS in counts:
        ordered[ACTIVATIONS] = counts[ACTIVATIONS]
    return FlopCount(total=sum(counts.values()), per_path=ordered,
                     conv_positions=dict(counts.conv_positions))
