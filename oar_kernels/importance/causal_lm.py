"""A Hugging Face causal LM as the importance ops drive it (SPEC sections 2, 3).

The accessors the ops use (`require_causal_lm`), the model's own logits and logprobs from
hidden states (a scaled or soft-capped head included: `logit_transform`), positions from the
attention mask, eval mode for a pass, a decoder forward on input embeddings, and per-token
logprobs of a clean forward. Shared by OAR-G, OAR-P, `oar_advantages` and the GRPO loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from oar_kernels.logprobs import CHUNK_BYTES, token_logprobs

CAUSAL_LM_METHODS = ("get_input_embeddings", "get_decoder", "get_output_embeddings")


def require_causal_lm(model) -> None:
    """The ops drive a Hugging Face causal LM through these accessors only."""
    if not isinstance(model, torch.nn.Module) or not all(
        callable(getattr(model, method, None)) for method in CAUSAL_LM_METHODS
    ):
        raise TypeError(
            f"model must be a Hugging Face causal LM (a torch.nn.Module with "
            f"{', '.join(CAUSAL_LM_METHODS)}), got {type(model).__name__}"
        )
    # A base model (no lm head) answers get_output_embeddings() with None.
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        if not isinstance(getattr(getattr(model, accessor)(), "weight", None), torch.Tensor):
            raise TypeError(
                f"model must be a causal LM with an lm head (model.{accessor}() has no weight), "
                f"got {type(model).__name__}"
            )


def vocab_size(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to its lm head's output l before the softmax:
    z = scale * l, then z = softcap * tanh(z / softcap) when softcap is set (SPEC section 3's z
    are the model's logits, so every outcome and logprob here goes through this)."""

    scale: float = 1.0  # Cohere `logit_scale`; 1 / Granite `logits_scaling`
    softcap: float | None = None  # Gemma-2 `final_logit_softcapping`

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits if self.scale == 1.0 else logits * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


def logit_transform(model) -> LogitTransform:
    """The model's logit transform, read from its (text) config; identity for plain heads."""
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scale /= float(getattr(config, "logits_scaling", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale, float(softcap) if softcap else None)


def lm_head_parameters(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits z [..., V] (float32, float64 for float64) of hidden states [..., H]."""
    weight, bias = lm_head_parameters(model)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return logit_transform(model)(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def head_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[target] for hidden [..., H] and targets [...] (z: `head_logits`);
    float32 (float64 for float64) shaped like targets, differentiable w.r.t. hidden.

    A scaled head is token_logprobs at temperature 1 / scale (no logits in memory). A
    soft-capped one is not linear, so its logits are made explicitly, in row chunks of
    logprobs.CHUNK_BYTES.
    """
    weight, bias = lm_head_parameters(model)
    transform = logit_transform(model)
    if transform.softcap is None:
        return token_logprobs(hidden, weight, targets, bias=bias, temperature=1.0 / transform.scale)
    flat, goals = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    budget = CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cpu"])
    rows = max(1, budget // (4 * weight.shape[0]))
    parts = [
        torch.log_softmax(head_logits(model, h), -1).gather(-1, t[:, None])[:, 0]
        for h, t in zip(flat.split(rows), goals.split(rows))
    ]
    if not parts:  # no rows
        return flat.new_zeros(targets.shape, dtype=torch.promote_types(flat.dtype, torch.float32))
    return torch.cat(parts).reshape(targets.shape)


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions follow the attention mask (SPEC section 2): left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for the pass (scores of a model in train mode would be random: the noised
    and clean forwards would differ by their dropout masks); every module's mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def decode(model, embeds, attention_mask):
    """The decoder's last hidden states [B, T, H] of input embeddings [B, T, H], positions
    from the attention mask [B, T] (no cache)."""
    out = model.get_decoder()(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def sequence_logprobs(model, hidden, input_ids, attention_mask):
    """log p(x_t | x_<t) at every real token with a real predecessor, 0 elsewhere ([B, T])."""
    with torch.no_grad():
        logp = head_logprobs(model, hidden[:, :-1].detach(), input_ids[:, 1:])
    valid = (attention_mask[:, 1:] & attention_mask[:, :-1]).bool()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[:, 1:] = torch.where(valid, logp, 0.0)
    return out


def clean_sequence_logprobs(model, input_ids, attention_mask):
    """Per-token logprobs [B, T] float32 of one clean batched forward (0 where undefined)."""
    if input_ids.numel() == 0:  # a decoder cannot run on no tokens
        return torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    with torch.no_grad(), eval_mode(model):
        embeds = model.get_input_embeddings()(input_ids)
        hidden = decode(model, embeds, attention_mask.long())
        return sequence_logprobs(model, hidden, input_ids, attention_mask.long())
