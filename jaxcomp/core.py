"""The compressed-leaf protocol: one base class, one decorator, `materialize`.

Every technique in jaxcomp stores its result as a *compressed leaf*: a small frozen dataclass
registered as a JAX pytree whose array fields are children and whose configuration fields are
static metadata. Each leaf knows the dense array it stands for (`materialize`) and how many bytes
it really stores (`nbytes`), so any model consumes a compressed tree through
`model.apply(materialize(tree), x)` and one report walks every technique.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CompressedLeaf",
    "bit_width",
    "checkpointable",
    "compressed_leaf",
    "from_checkpointable",
    "is_compressed",
    "materialize",
    "static_field",
    "stored_nbytes",
]

_T = TypeVar("_T", bound=type)


class CompressedLeaf(abc.ABC):
    """Base class of every compressed leaf.

    Subclasses are declared with the `compressed_leaf` decorator, which makes them frozen
    dataclasses and registers them with `jax.tree_util`: fields declared with `static_field` are
    static metadata (part of the tree structure, so a change recompiles), every other field is a
    child (an array, or another compressed leaf).

    A subclass implements `materialize`. It may override `shape` and `dtype` (the default traces
    `materialize` abstractly, which costs no compute) and `nbytes` (the default adds up the
    children, counting sub-byte integer dtypes at their real width).

    Example:
        >>> @compressed_leaf
        ... class Scaled(CompressedLeaf):
        ...     values: jax.Array
        ...     scale: jax.Array
        ...     def materialize(self):
        ...         return self.values * self.scale
        >>> leaf = Scaled(jnp.ones((2, 3)), jnp.float32(0.5))
        >>> materialize({"w": leaf})["w"].sum()
        Array(3., dtype=float32)
    """

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """Returns the dense floating-point array this leaf stands for."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense array."""
        # The leaf is passed in (not closed over) so that abstract leaves, whose fields are
        # ShapeDtypeStructs, trace too.
        return tuple(jax.eval_shape(lambda leaf: leaf.materialize(), self).shape)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the dense array."""
        return jax.eval_shape(lambda leaf: leaf.materialize(), self).dtype

    @property
    def size(self) -> int:
        """Number of elements of the dense array."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes this leaf stores, counting sub-byte dtypes (int4, int2) at their real width."""
        total = 0
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if field.metadata.get("static"):
                continue
            total += stored_nbytes(getattr(self, field.name))
        return total

    @property
    def kind(self) -> str:
        """Short name of the technique, shown by `jaxcomp.report`."""
        return type(self).__name__

    def summary(self) -> str:
        """One line describing the encoding (bits, granularity, rank...), shown by reports."""
        return ""


def static_field(**kwargs: Any) -> Any:
    """A dataclass field that is static pytree metadata rather than a child array."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["static"] = True
    return dataclasses.field(metadata=metadata, **kwargs)


def compressed_leaf(cls: _T) -> _T:
    """Class decorator: a frozen dataclass registered as a pytree with static fields as metadata.

    Args:
      cls: a subclass of `CompressedLeaf` with annotated fields.

    Returns:
      The class, as a frozen dataclass registered with `jax.tree_util.register_dataclass`.

    Raises:
      TypeError: if `cls` does not derive from `CompressedLeaf`.

    Example:
        >>> @compressed_leaf
        ... class Halved(CompressedLeaf):
        ...     values: jax.Array
        ...     note: str = static_field(default="")
        ...     def materialize(self):
        ...         return self.values / 2
        >>> jax.tree.leaves(Halved(jnp.ones(3), note="x"))
        [Array([1., 1., 1.], dtype=float32)]
    """
    if not (isinstance(cls, type) and issubclass(cls, CompressedLeaf)):
        raise TypeError(f"compressed_leaf expects a subclass of CompressedLeaf, got {cls!r}")
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls


def is_compressed(x: Any) -> bool:
    """True when `x` is a compressed leaf (a `CompressedLeaf` instance).

    Example:
        >>> is_compressed(jnp.ones(3))
        False
    """
    return isinstance(x, CompressedLeaf)


def materialize(tree: Any, *, keep: type | tuple[type, ...] = ()) -> Any:
    """Replaces every compressed leaf of `tree` by its dense array; plain leaves are untouched.

    It is a `jax.tree.map` over the tree, so it works on any pytree (Linen `params` dicts, NNX
    `State`, lists, optax states) inside or outside `jax.jit`. A tree without compressed leaves
    comes back as the same arrays and adds nothing to a traced computation.

    Args:
      tree: any pytree, or a single compressed leaf.
      keep: compressed leaf classes (a class, or a tuple or list of them) left as they are, e.g.
        the factorized kernels that `jaxcomp.nn.decompose.intercept_factorized` runs:
        `materialize(tree, keep=Factorized)`.

    Returns:
      The tree with each compressed leaf (not of a `keep` class) replaced by `leaf.materialize()`.

    Example:
        >>> params = {"dense": {"kernel": jnp.ones((2, 2))}}
        >>> materialize(params)["dense"]["kernel"].shape
        (2, 2)

    Raises:
      ValueError: if `keep` is not a class or a sequence of classes.
    """
    keep = tuple(keep) if isinstance(keep, (list, tuple, set, frozenset)) else (keep,)
    bad = [k for k in keep if not isinstance(k, type)]
    if bad:
        raise ValueError(f"materialize: keep must be compressed-leaf classes, got {bad[0]!r}")
    return jax.tree.map(
        lambda x: x.materialize() if is_compressed(x) and not isinstance(x, keep) else x,
        tree, is_leaf=is_compressed,
    )


def bit_width(dtype: Any) -> int:
    """Bits one element of `dtype` occupies when packed: 4 for int4, 2 for int2, 8 for bool (XLA
    stores a byte per bool; packed bitmasks are a compressed leaf's own business).

    Raises:
      ValueError: if `dtype` is None or not a dtype (NumPy would read None as float64).

    Example:
        >>> bit_width(jnp.int4), bit_width(jnp.float32)
        (4, 32)
    """
    if dtype is None:
        raise ValueError("bit_width: dtype is None (pass a dtype, e.g. jnp.float32)")
    try:
        is_key = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        if not is_key:
            dtype = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"bit_width: {dtype!r} is not a dtype") from e
    if is_key:
        return 32 * math.prod(jax.eval_shape(jax.random.key_data,
                                             jax.ShapeDtypeStruct((), dtype)).shape)
    if dtype == np.bool_:
        return 8
    if np.issubdtype(dtype, np.complexfloating):
        return dtype.itemsize * 8
    try:
        return int(jnp.iinfo(dtype).bits)
    except ValueError:
        pass
    try:
        return int(jnp.finfo(dtype).bits)
    except ValueError:
        return dtype.itemsize * 8


def stored_nbytes(tree: Any) -> int:
    """Bytes stored by every array in `tree`, compressed leaves by their own `nbytes`.

    Sub-byte dtypes count at their bit width, rounded up to whole bytes per array.

    Raises:
      ValueError: naming the path, for a Python int too large for the integer dtype JAX
        would store it in (int32 unless x64 is on).

    Example:
        >>> stored_nbytes({"a": jnp.zeros((10,), jnp.int4), "b": jnp.zeros((2,), jnp.float32)})
        13
    """
    from jaxcomp.tree import key_path_str  # jaxcomp.tree imports this module

    total = 0
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_compressed):
        if is_compressed(leaf):
            total += leaf.nbytes
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += -(-math.prod(leaf.shape) * bit_width(leaf.dtype) // 8)
        else:  # Python scalars: the dtype JAX stores them in (int32/float32 without x64)
            try:
                total += bit_width(leaf_dtype(leaf)) // 8
            except ValueError as e:
                raise ValueError(f"stored_nbytes: leaf {key_path_str(key_path)!r}: {e}") from e
    return total


def leaf_dtype(leaf: Any) -> Any:
    """The dtype `leaf` has as a JAX value: Python scalars as JAX stores them (int32 and
    float32 unless x64 is on), arrays and `ShapeDtypeStruct`s their own."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None:
        return dtype
    if isinstance(leaf, (bool, int, float, complex)):
        try:
            return jax.eval_shape(lambda: jnp.asarray(leaf)).dtype
        except OverflowError as e:  # a Python int past int32 (int64 with x64) has no JAX dtype
            raise ValueError(
                f"the Python int {leaf} does not fit the integer dtype JAX stores Python ints in "
                f"({e}); store it as a NumPy int64 or float, or enable x64"
            ) from e
    return np.asarray(leaf).dtype


def _unsigned_sub_byte() -> dict[np.dtype, np.dtype]:
    return {np.dtype(jnp.uint4): np.dtype(jnp.int4), np.dtype(jnp.uint2): np.dtype(jnp.int2)}


def checkpointable(tree: Any) -> Any:
    """`tree` with every uint4 / uint2 array re-typed as int4 / int2 holding the same bits.

    Orbax's TensorStore backend writes int4 and int2 but not their unsigned forms, which hold
    4-bit codebook indices and unsigned 4- and 2-bit `QArray` codes. Save `checkpointable(state)`
    and restore with `from_checkpointable(restored, like=state)`; a restore target given as
    abstract arrays (`jax.ShapeDtypeStruct`) goes through `checkpointable` too. Other leaves,
    shardings and the tree structure are unchanged. Works inside and outside `jax.jit`.

    Example:
        >>> tree = {"codes": jnp.array([0, 9, 15], jnp.uint4)}
        >>> saved = checkpointable(tree)
        >>> saved["codes"].dtype
        dtype(int4)
        >>> from_checkpointable(saved, like=tree)["codes"]
        Array([0, 9, 15], dtype=uint4)
    """
    table = _unsigned_sub_byte()

    def one(x):
        dtype = getattr(x, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (
                np.dtype(dtype) not in table):
            return x
        signed = table[np.dtype(dtype)]
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, signed, sharding=x.sharding)
        half = 1 << (bit_width(dtype) - 1)
        v = jnp.asarray(x).astype(jnp.int32)
        return jnp.where(v >= half, v - 2 * half, v).astype(signed)

    return jax.tree.map(one, tree)


def from_checkpointable(tree: Any, *, like: Any) -> Any:
    """The inverse of `checkpointable`: leaves whose counterpart in `like` (the original tree, or
    its abstract `jax.eval_shape`) is uint4 / uint2 get their unsigned values back.

    Raises:
      ValueError: if `tree` and `like` do not have the same structure.

    Example:
        >>> like = {"codes": jax.ShapeDtypeStruct((2,), jnp.uint2)}
        >>> from_checkpointable({"codes": jnp.array([-1, 1], jnp.int2)}, like=like)["codes"]
        Array([3, 1], dtype=uint2)
    """
    table = _unsigned_sub_byte()
    try:
        like_leaves = jax.tree.structure(tree).flatten_up_to(like)
    except (ValueError, TypeError) as e:
        raise ValueError(f"from_checkpointable: tree and like differ in structure: {e}") from e

    def one(x, ref):
        dtype = getattr(ref, "dtype", None)
        if dtype is None or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or (
                np.dtype(dtype) not in table):
            return x
        mask = (1 << bit_width(dtype)) - 1
        return (jnp.asarray(x).astype(jnp.int32) & mask).astype(dtype)

    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [one(x, r) for x, r in zip(leaves, like_leaves)])
