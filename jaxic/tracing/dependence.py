"""Which outputs of a traced function depend on which of its inputs, read from its jaxpr.

Used to find, once per compilation, the token positions whose executed-mask or prior-drawn value
can change between particles (they depend on the decoded values or the model's key): only those
need the model to run while the proposal decodes.
"""

from __future__ import annotations

from typing import Sequence

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal


def dependent_outputs(jaxpr: ClosedJaxpr | Jaxpr, dependent_inputs: Sequence[bool]) -> list[bool]:
    """For each output of ``jaxpr``, whether it can depend on an input flagged in ``dependent_inputs``.

    Exact up to the granularity of whole arrays: an output computed only from constants (closed-over
    values, literals) is independent. Loops (``scan``, ``while``) and branches (``cond``) are followed
    into their bodies; a call of any other primitive with a sub-jaxpr is followed when its operands map
    one to one onto the sub-jaxpr's inputs, and otherwise counted as depending on all of its operands.

    Example:
        >>> closed = jax.make_jaxpr(lambda a, b: (a + 1.0, jnp.ones(3)))(1.0, 2.0)
        >>> dependent_outputs(closed, [True, False])
        [True, False]
    """
    inner = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    if len(dependent_inputs) != len(inner.invars):
        raise ValueError(f"dependent_outputs: the jaxpr has {len(inner.invars)} inputs, "
                         f"got {len(dependent_inputs)} flags")
    flags: dict = {v: bool(d) for v, d in zip(inner.invars, dependent_inputs)}

    def depends(atom) -> bool:
        return not isinstance(atom, Literal) and flags.get(atom, False)

    for eqn in inner.eqns:
        outs = _equation(eqn, [depends(a) for a in eqn.invars])
        for var, flag in zip(eqn.outvars, outs):
            flags[var] = flag
    return [depends(v) for v in inner.outvars]


def _equation(eqn, ins: list[bool]) -> list[bool]:
    n_out = len(eqn.outvars)
    if not any(ins):
        return [False] * n_out  # jax primitives are pure: no dependent operand, no dependent result
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return _scan(params, ins)
    if name == "while":
        return _while(params, ins, n_out)
    if name == "cond":
        if ins[0]:  # the branch taken depends on the inputs
            return [True] * n_out
        per_branch = [dependent_outputs(b, ins[1:]) for b in params["branches"]]
        return [any(column) for column in zip(*per_branch)]
    subs = [p for p in params.values() if isinstance(p, (ClosedJaxpr, Jaxpr))]
    if len(subs) == 1:
        sub = subs[0].jaxpr if isinstance(subs[0], ClosedJaxpr) else subs[0]
        if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            return dependent_outputs(subs[0], ins)
    return [True] * n_out


def _scan(params, ins: list[bool]) -> list[bool]:
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    while True:  # a carry that depends after one step depends from then on: iterate to the fixed point
        outs = dependent_outputs(params["jaxpr"], consts + carry + xs)
        new_carry = [a or b for a, b in zip(carry, outs[:n_carry])]
        if new_carry == carry:
            return carry + outs[n_carry:]
        carry = new_carry


def _while(params, ins: list[bool], n_out: int) -> list[bool]:
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, carry = ins[:n_cond], ins[n_cond:n_cond + n_body], ins[n_cond + n_body:]
    while True:
        if dependent_outputs(params["cond_jaxpr"], cond_consts + carry)[0]:
            return [True] * n_out  # the trip count depends on the inputs
        outs = dependent_outputs(params["body_jaxpr"], body_consts + carry)
        new_carry = [a or b for a, b in zip(carry, outs)]
        if new_carry == carry:
            return carry
        carry = new_carry
