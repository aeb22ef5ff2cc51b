"""Every `oar::` op schema and its fake (meta) kernel, in one place.

Implementations are registered per device elsewhere: the C++ extension (csrc/) for CPU when
it is built, otherwise the vectorized torch path; Triton for CUDA. Because the schemas live
here, `torch.ops.oar.*` exists and traces under `torch.compile` even without the extension.
"""
import torch

lib = torch.library.Library("oar", "DEF")

# SPEC section 6. score_mask is bool; the weights are float32 and carry no gradient.
lib.define(
    "bilevel_weights(Tensor scores, Tensor score_mask, float tau, float beta, float floor, "
    "bool preserve_mass) -> Tensor"
)
# Writes the weights into a preallocated float32 [B, T] `out` (tests poison it first).
lib.define(
    "bilevel_weights_into(Tensor scores, Tensor score_mask, float tau, float beta, float floor, "
    "bool preserve_mass, Tensor(a!) out) -> ()"
)
# advantages: [B] or [B, T]; returns A_{b,t} = A_b * w_{b,t} as float32 [B, T].
lib.define(
    "reshape_advantages(Tensor advantages, Tensor scores, Tensor score_mask, float tau, "
    "float beta, float floor, bool preserve_mass) -> Tensor"
)


@torch.library.register_fake("oar::bilevel_weights")
def _bilevel_weights_fake(scores, score_mask, tau, beta, floor, preserve_mass):
    return torch.empty_like(scores, dtype=torch.float32)


@torch.library.register_fake("oar::bilevel_weights_into")
def _bilevel_weights_into_fake(scores, score_mask, tau, beta, floor, preserve_mass, out):
    return None


@torch.library.register_fake("oar::reshape_advantages")
def _reshape_advantages_fake(advantages, scores, score_mask, tau, beta, floor, preserve_mass):
    return torch.empty_like(scores, dtype=torch.float32)
