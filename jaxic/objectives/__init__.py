"""Training objectives, built Optax-style: factories return a complete :class:`Objective`.

``objective.loss(network, model, key, batch_size, data, *, plate=None, sharding=None) -> (loss, metrics)``
draws what it needs from ``key`` (joint samples, proposal draws, a minibatch of ``data``) and
returns a scalar loss to minimise and a dict of scalar metrics (``objective.metrics`` names
them; ``"dropped"`` and ``"dropped_site"`` are always there: non-finite draws are left out
of the loss and counted, see :mod:`jaxic.objectives.finite`). ``model`` is a
:class:`jaxic.tracing.ParameterisedModel` carrying the model's learnable parameters;
``needs_data`` (real observations required) and ``trains_model`` (gradients reach and update
the model's parameters) say how to drive it. Select by name with
``objective="forward_kl" | "elbo" | "rws"`` or pass ``elbo(num_particles=4)``.

Example:
    >>> objective = resolve("rws")
    >>> rebuilt = OBJECTIVES[objective.name](**objective.options)   # how checkpoints rebuild it
"""

from __future__ import annotations

from jaxic.errors import JaxicError
from jaxic.objectives.base import Objective
from jaxic.objectives.data import LocalPlate, per_datum
from jaxic.objectives.elbo import elbo
from jaxic.objectives.finite import (check_data_finite, drop_warning, dropped_site_name, nonfinite_sites,
                                     sample_joint_checked, site_names)
from jaxic.objectives.forward_kl import forward_kl, forward_kl_loss
from jaxic.objectives.rws import rws

OBJECTIVES = {"forward_kl": forward_kl, "elbo": elbo, "rws": rws}


def resolve(objective) -> Objective:
    """An :class:`Objective` from its name, an instance, or ``None`` (``forward_kl()``).

    Example:
        >>> resolve("elbo").options
        {'num_particles': 1}
    """
    if objective is None:
        return forward_kl()
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise JaxicError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} or pass one "
                             "built by a factory such as jaxic.objectives.elbo(num_particles=4).")
        return OBJECTIVES[objective]()
    if not isinstance(objective, Objective):
        raise JaxicError(f"objective must be a name in {sorted(OBJECTIVES)} or a jaxic.objectives.Objective (from "
                         f"{', '.join(f'jaxic.objectives.{n}()' for n in OBJECTIVES)}), got {objective!r}.")
    return objective


__all__ = ["OBJECTIVES", "Objective", "LocalPlate", "check_data_finite", "drop_warning", "dropped_site_name",
           "elbo", "forward_kl", "forward_kl_loss", "nonfinite_sites", "per_datum", "resolve", "rws",
           "sample_joint_checked", "site_names"]
