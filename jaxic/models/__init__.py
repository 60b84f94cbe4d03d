"""Example models used by the demo, tests, notebooks and benchmarks."""

from jaxic.models.examples import coin_flips, gaussian_unknown_mean, gaussian_unknown_mean_posterior, pedagogical

__all__ = ["coin_flips", "gaussian_unknown_mean", "gaussian_unknown_mean_posterior", "pedagogical"]
