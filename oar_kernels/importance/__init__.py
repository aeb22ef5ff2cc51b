"""Token importance: OAR-G (input-gradient saliency) and OAR-P (counterfactual masking)."""

from oar_kernels.importance.gradient import gradient_importance
from oar_kernels.importance.perturbation import PerturbationStats, perturbation_importance

__all__ = ["PerturbationStats", "gradient_importance", "perturbation_importance"]
