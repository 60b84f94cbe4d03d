"""Example models used by the demo, tests, notebooks and benchmarks."""

from jaxic.models.circuit import (COMPONENTS, FREQUENCIES_HZ, circuit, circuit_response, fault_label,
                                  fault_posterior, latent_response)
from jaxic.models.control_flow import (hmm, hmm_posterior, hmm_unrolled, pedagogical_plate, poisson_branch,
                                       poisson_branch_posterior, poisson_branch_universal, random_objects,
                                       random_objects_posterior, random_objects_universal, rejection_model,
                                       rejection_model_universal, rejection_posterior)
from jaxic.models.examples import coin_flips, gaussian_unknown_mean, gaussian_unknown_mean_posterior, pedagogical

__all__ = ["coin_flips", "gaussian_unknown_mean", "gaussian_unknown_mean_posterior", "pedagogical",
           "pedagogical_plate", "poisson_branch", "poisson_branch_universal", "poisson_branch_posterior",
           "random_objects", "random_objects_universal", "random_objects_posterior", "hmm", "hmm_unrolled",
           "hmm_posterior", "rejection_model", "rejection_model_universal", "rejection_posterior", "circuit",
           "circuit_response", "latent_response", "fault_label", "fault_posterior", "COMPONENTS", "FREQUENCIES_HZ"]
