"""Every `oar::` op schema and its fake (meta) kernel, in one place.

Implementations are registered per device elsewhere: the C++ extension (csrc/) for CPU when
it is built, otherwise the vectorized torch path; Triton for CUDA. Because the schemas live
here, `torch.ops.oar.*` exists and traces under `torch.compile` even without the extension.
"""

import torch

lib = torch.library.Library("oar", "DEF")

# SPEC section 6. score_mask is bool; the weights are float32 and carry no gradient.
# check_finite=False skips the value checks that read a flag back to the host (a sync per
# call on a GPU): non-finite scores then give unspecified weights (the C++ CPU kernel checks
# anyway, at no cost).
lib.define(
    "bilevel_weights(Tensor scores, Tensor score_mask, float tau, float beta, float floor, "
    "bool preserve_mass, bool check_finite=True) -> Tensor"
)
# Writes the weights into a preallocated float32 [B, T] `out` (`bilevel_weights(out=)`).
lib.define(
    "bilevel_weights_into(Tensor scores, Tensor score_mask, float tau, float beta, float floor, "
    "bool preserve_mass, Tensor(a!) out, bool check_finite=True) -> ()"
)
# advantages: [B] or [B, T]; returns A_{b,t} = A_b * w_{b,t} as float32 [B, T].
lib.define(
    "reshape_advantages(Tensor advantages, Tensor scores, Tensor score_mask, float tau, "
    "float beta, float floor, bool preserve_mass, bool check_finite=True) -> Tensor"
)


# SPEC sections 7-8: per-token log pi(target | hidden) through the lm head without [N, V]
# logits. hidden [N, H], weight [V, H], targets [N] int, bias [V] or None. Returns float32
# (float64 for float64 inputs) logprobs [N], entropy ([N], or [0] when not asked for) and
# the logsumexp [N] that the backward reuses.
lib.define(
    "token_logprobs(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
    "float temperature, bool return_entropy) -> (Tensor, Tensor, Tensor)"
)
lib.define(
    "token_logprobs_backward(Tensor grad_logprobs, Tensor grad_entropy, Tensor hidden, "
    "Tensor weight, Tensor targets, Tensor? bias, Tensor lse, Tensor entropy, "
    "float temperature) -> (Tensor, Tensor, Tensor)"
)


# SPEC section 7: the clipped surrogate through the lm head, gradients computed in the forward
# (the loss is a scalar). Rows are tokens: hidden [N, H], targets/advantages/old/ref [N];
# token_weight [N] is the loss_type's aggregation weight, metric_weight [N] the mask / count.
# Returns loss [], metrics [3] (clip fraction, mean KL, mean ratio), logprobs [N] and the
# gradients w.r.t. hidden, weight and bias (bias: [0] without one). With compute_grads=False
# (nothing needs them: no_grad, or no input requires grad) the gradients are [0] and the
# backward walk is skipped.
lib.define(
    "grpo_loss(Tensor hidden, Tensor weight, Tensor targets, Tensor advantages, "
    "Tensor token_weight, Tensor metric_weight, Tensor? old_logprobs, Tensor? ref_logprobs, "
    "Tensor? bias, float epsilon_low, float epsilon_high, float beta, float temperature, "
    "bool compute_grads=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)


# SPEC section 5: OAR-G saliency |sum_h grad * embeds| on score_mask, 0 elsewhere.
# grad, embeds [B, T, H] float; score_mask [B, T] bool. Returns [B, T] float32.
lib.define("saliency(Tensor grad, Tensor embeds, Tensor score_mask) -> Tensor")


@torch.library.register_fake("oar::saliency")
def _saliency_fake(grad, embeds, score_mask):
    return score_mask.new_empty(score_mask.shape, dtype=torch.float32)


@torch.library.register_fake("oar::grpo_loss")
def _grpo_loss_fake(
    hidden,
    weight,
    targets,
    advantages,
    token_weight,
    metric_weight,
    old_logprobs,
    ref_logprobs,
    bias,
    epsilon_low,
    epsilon_high,
    beta,
    temperature,
    compute_grads=True,
):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    grads = compute_grads
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(3, dtype=acc),
        hidden.new_empty(hidden.shape[0], dtype=acc),
        hidden.new_empty(hidden.shape if grads else (0,)),
        weight.new_empty(weight.shape if grads else (0,)),
        weight.new_empty(weight.shape[0] if bias is not None and grads else 0),
    )


@torch.library.register_fake("oar::token_logprobs")
def _token_logprobs_fake(hidden, weight, targets, bias, temperature, return_entropy):
    rows = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    new = hidden.new_empty
    return new(rows, dtype=acc), new(rows if return_entropy else 0, dtype=acc), new(rows, dtype=acc)


@torch.library.register_fake("oar::token_logprobs_backward")
def _token_logprobs_backward_fake(
    grad_logprobs, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature
):
    grad_bias = weight.new_empty(weight.shape[0] if bias is not None else 0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


# Every real kernel returns contiguous outputs, whatever its inputs' strides; the fakes must
# say so (empty_like would copy a transposed input's strides).


@torch.library.register_fake("oar::bilevel_weights")
def _bilevel_weights_fake(scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True):
    return scores.new_empty(scores.shape, dtype=torch.float32)


@torch.library.register_fake("oar::bilevel_weights_into")
def _bilevel_weights_into_fake(
    scores, score_mask, tau, beta, floor, preserve_mass, out, check_finite=True
):
    return None


@torch.library.register_fake("oar::reshape_advantages")
def _reshape_advantages_fake(
    advantages, scores, score_mask, tau, beta, floor, preserve_mass, check_finite=True
):
    return scores.new_empty(scores.shape, dtype=torch.float32)
