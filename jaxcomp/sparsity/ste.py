"""Straight-through pruning: the forward pass sees masked weights, the backward pass is dense.

`pruned_forward(params, masks)` inside the loss gives the model `where(mask, w, 0)`, while the
gradient reaches every weight as if no mask were there (a `custom_jvp` whose tangent is the
identity, so forward and reverse mode both work), so pruned weights keep training and can come
back when the masks are recomputed. Pair it with
`prune(tx, pruner, straight_through=True)`, which recomputes the masks on schedule but leaves the
weights dense, and `masks_of(opt_state)`.

Example:
    >>> w = jnp.array([1., -2., 3.])
    >>> mask = jnp.array([True, False, True])
    >>> jax.grad(lambda w: jnp.sum(pruned_forward({"w": w}, {"w": mask})["w"] ** 2))(w)
    Array([2., 0., 6.], dtype=float32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcomp.core import is_compressed
from jaxcomp.sparsity.masks import mask_leaves

__all__ = ["pruned_forward", "straight_through_mask"]


@jax.custom_jvp
def straight_through_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """`where(mask, x, 0)` forward; derivatives treat it as the identity on `x` (mask or not).

    A `custom_jvp` whose tangent is the tangent of `x`: it is linear, so reverse mode
    (`grad`) transposes it and passes the cotangent through, and forward mode (`jvp`, `jacfwd`,
    `hessian`) works too.

    Example:
        >>> jax.grad(lambda x: straight_through_mask(x, jnp.array([False, True])).sum())(
        ...     jnp.array([5., 6.]))
        Array([1., 1.], dtype=float32)
    """
    try:
        fits = jnp.broadcast_shapes(jnp.shape(mask), jnp.shape(x)) == jnp.shape(x)
    except ValueError:
        fits = False
    if not fits:
        # A mask that broadcasts x to a larger shape would silently change the output's shape.
        raise ValueError(f"straight_through_mask: mask of shape {jnp.shape(mask)} does not "
                         f"broadcast to x of shape {jnp.shape(x)}")
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


@straight_through_mask.defjvp
def _straight_through_jvp(primals, tangents):
    x, mask = primals
    x_dot, _ = tangents
    return straight_through_mask(x, mask), x_dot


def pruned_forward(params: Any, masks: Any) -> Any:
    """The params with pruned weights zeroed for the forward pass, dense for the gradient.

    A pruned weight receives the gradient with respect to its (zeroed) forward value, passed
    straight through, so the optimizer keeps moving it.

    Args:
      params: the dense parameter tree.
      masks: a mask tree (`None` at unpruned leaves), e.g. `masks_of(opt_state)`.

    Returns:
      A tree like `params`.

    Raises:
      ValueError: if `masks` does not fit `params`, naming the path.

    Example:
        >>> g = jax.grad(lambda w: pruned_forward({"w": w}, {"w": jnp.array([False, True])})["w"]
        ...              @ jnp.array([3., 4.]))(jnp.array([1., 1.]))
        >>> g
        Array([3., 4.], dtype=float32)
    """
    triples = mask_leaves(params, masks)
    treedef = jax.tree.structure(params, is_leaf=is_compressed)
    for path, param, mask in triples:
        if mask is not None and is_compressed(param):
            raise ValueError(f"{path}: pruned_forward needs the dense weight, got a compressed "
                             f"leaf ({param.kind}); pass jaxcomp.materialize(params)")
    out = [
        param if mask is None else straight_through_mask(
            param, jnp.broadcast_to(mask.astype(bool), jnp.shape(param)))
        for _, param, mask in triples
    ]
    return jax.tree.unflatten(treedef, out)
