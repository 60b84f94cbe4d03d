"""Training objectives behind one protocol.

An objective is a callable ``objective(network, key, batch_size) -> (loss, metrics)``
that draws whatever it needs from ``key`` and returns a scalar loss to minimise.
"""

from jaxic.objectives.forward_kl import ForwardKL, forward_kl_loss

__all__ = ["ForwardKL", "forward_kl_loss"]
