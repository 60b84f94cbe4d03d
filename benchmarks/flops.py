"""Dense matrix-product FLOPs of a jaxpr, counted exactly from its ``dot_general`` equations.

Used by ``benchmarks/throughput.py`` for the training step's and the sampler's FLOPs (and
their share of the machine's matmul rate). XLA's ``cost_analysis()`` counts a loop body once;
here a ``scan`` body counts its trip count.

Example:
    >>> from benchmarks.flops import matmul_flops
    >>> matmul_flops(jax.make_jaxpr(jnp.dot)(jnp.ones((4, 3)), jnp.ones((3, 2))).jaxpr)
    48.0
"""

from __future__ import annotations

import math

__all__ = ["dot_flops", "matmul_products", "matmul_flops"]


def _subjaxprs(value):
    """Jaxprs held in an equation parameter (a Jaxpr, a ClosedJaxpr, or tuples of them)."""
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def dot_flops(lhs: tuple, rhs: tuple, dims) -> float:
    """FLOPs of one ``dot_general`` of operands shaped ``lhs`` and ``rhs``: 2 x output size x contraction.

    Example:
        >>> dot_flops((4, 3), (3, 2), (((1,), (0,)), ((), ())))
        48.0
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dims
    lhs_free = [n for i, n in enumerate(lhs) if i not in (*lhs_contract, *lhs_batch)]
    rhs_free = [n for i, n in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    out = math.prod(lhs[i] for i in lhs_batch) * math.prod(lhs_free) * math.prod(rhs_free)
    return 2.0 * out * math.prod(lhs[i] for i in lhs_contract)


def matmul_products(jaxpr, times: int = 1, found: dict | None = None) -> dict:
    """Every distinct ``dot_general`` a jaxpr executes, as ``{(lhs shape, rhs shape, dimension numbers,
    dtype): executions}``.

    A ``scan`` body counts ``length`` times, a ``cond`` its most expensive branch, a ``while``
    body once (unknown trip count; jaxic's training and sampling loops are scans).

    Example:
        >>> matmul_products(jax.make_jaxpr(jnp.dot)(jnp.ones((4, 3)), jnp.ones((3, 2))).jaxpr)
        {((4, 3), (3, 2), (((1,), (0,)), ((), ())), 'float32'): 1}
    """
    found = {} if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval for v in eqn.invars[:2])
            key = (lhs.shape, rhs.shape, eqn.params["dimension_numbers"], str(lhs.dtype))
            found[key] = found.get(key, 0) + times
        elif name == "scan":
            matmul_products(eqn.params["jaxpr"].jaxpr, times * eqn.params["length"], found)
        elif name == "cond":
            branches = [b.jaxpr for b in eqn.params["branches"]]
            matmul_products(max(branches, key=matmul_flops), times, found)
        else:
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    matmul_products(sub, times, found)
    return found


def matmul_flops(jaxpr) -> float:
    """FLOPs of the dense matrix products (``dot_general``) a jaxpr executes (loops as in
    :func:`matmul_products`).

    Example:
        >>> matmul_flops(jax.make_jaxpr(lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, length=5)[0])(
        ...     jnp.ones((8, 8))).jaxpr)
        5120.0
    """
    return sum(count * dot_flops(lhs, rhs, dims) for (lhs, rhs, dims, _), count in matmul_products(jaxpr).items())
