"""Example models used by the demo, tests, notebooks and benchmarks."""

from jaxic.models.arth150 import (Arth150, Arth150Layout, arth150, arth150_joint, arth150_layout,
                                  arth150_log_evidence, arth150_posterior, exact_posterior_log_prob,
                                  exact_posterior_samples, gaussian_fit, kl_gaussian, load_arth150,
                                  simulate_arth150, stack_sites, unstack_sites)
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
           "circuit_response", "latent_response", "fault_label", "fault_posterior", "COMPONENTS", "FREQUENCIES_HZ",
           "arth150", "Arth150", "Arth150Layout", "load_arth150", "arth150_layout", "arth150_joint",
           "arth150_posterior", "arth150_log_evidence", "exact_posterior_samples", "exact_posterior_log_prob",
           "simulate_arth150", "stack_sites", "unstack_sites", "gaussian_fit", "kl_gaussian"]
from jaxic.models.vae import Decoder, Encoder, vae, vae_guide, vae_numpyro  # noqa: E402

__all__ += ["Decoder", "Encoder", "vae", "vae_numpyro", "vae_guide"]
