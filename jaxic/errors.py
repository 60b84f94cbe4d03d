"""One exception hierarchy for everything jaxic reports to users.

Every message names the site, argument or file at fault and says how to fix it.
"""


class JaxicError(Exception):
    """Base class of every error jaxic raises on bad input."""


class ModelError(JaxicError):
    """The model cannot be compiled as written (no latent sites, bad site, ...)."""


class UntraceableModelError(ModelError):
    """The model cannot run under ``jax.jit`` (Python control flow on sampled values)."""


class ObservationError(JaxicError):
    """An observed site or an observation value does not fit the model."""


class NoLikelihoodError(ObservationError):
    """Importance weights, the evidence or a data objective were asked of a model whose observed site
    is a simulator's output (a ``Delta``): there is no p(obs | latents) to weigh with."""


class UnsupportedDistributionError(JaxicError):
    """A latent site has a distribution for which no proposal head exists yet."""


class UnknownSiteError(JaxicError, KeyError):
    """A site name that the model or the posterior does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class CheckpointError(JaxicError):
    """A checkpoint is missing, incomplete, or written for another model."""


class MissingDependencyError(JaxicError, ImportError):
    """An optional dependency (an extra such as ``jaxic[arviz]``) is not installed."""


class IndexOutOfRangeError(JaxicError, IndexError):
    """An index (``post[i]``) outside its axis; an ``IndexError`` too, so iteration stops there."""


class StallWarning(UserWarning):
    """A compiled computation has run far longer than it should (see :func:`jaxic.loops.wait_ready`)."""
