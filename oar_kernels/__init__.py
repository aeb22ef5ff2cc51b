"""oar-kernels: fused kernels for Outcome-grounded Advantage Reshaping (OAR) in GRPO.

    import oar_kernels as ok
    per_token = ok.reshape_advantages(advantages, scores, score_mask)

The README has the math and examples; `oar_kernels.info()` lists the active backends.
"""

from oar_kernels import (
    _extension,  # noqa: F401  (schemas, then the C++ kernels)
    spans,
)
from oar_kernels._info import info
from oar_kernels.importance import gradient_importance, perturbation_importance
from oar_kernels.logprobs import token_logprobs
from oar_kernels.loss import GRPOLoss, grpo_loss
from oar_kernels.pipeline import OARAdvantages, oar_advantages
from oar_kernels.reshape import bilevel_weights, reshape_advantages

__version__ = "0.1.0"
__all__ = [
    "GRPOLoss",
    "OARAdvantages",
    "bilevel_weights",
    "gradient_importance",
    "grpo_loss",
    "info",
    "oar_advantages",
    "perturbation_importance",
    "reshape_advantages",
    "spans",
    "token_logprobs",
    "__version__",
]
