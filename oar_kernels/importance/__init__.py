"""Token importance: OAR-G (input-gradient saliency). OAR-P arrives with issue 5."""

from oar_kernels.importance.gradient import gradient_importance

__all__ = ["gradient_importance"]
