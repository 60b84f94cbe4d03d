"""Training objectives behind one protocol.

An objective is a frozen dataclass called as
``objective(network, model, key, batch_size, data) -> (loss, metrics)``: it draws what it
needs from ``key`` (joint samples, proposal draws, a minibatch of ``data``) and returns a
scalar loss to minimise. ``model`` is a :class:`jaxic.tracing.ParameterisedModel` carrying
the model's learnable parameters. Two class attributes say how to drive it:
``needs_data`` (real observations required) and ``trains_model`` (gradients reach the
model's parameters). ``spec`` (and ``plate`` for local amortization) are filled in by
:func:`jaxic.compile`; select by name with ``objective="forward_kl" | "elbo" | "rws"``.
"""

from jaxic.objectives.data import LocalPlate, per_datum
from jaxic.objectives.elbo import ELBO
from jaxic.objectives.forward_kl import ForwardKL, forward_kl_loss
from jaxic.objectives.rws import ReweightedWakeSleep

OBJECTIVES = {"forward_kl": ForwardKL, "elbo": ELBO, "rws": ReweightedWakeSleep}

__all__ = ["OBJECTIVES", "ELBO", "ForwardKL", "LocalPlate", "ReweightedWakeSleep", "forward_kl_loss", "per_datum"]
