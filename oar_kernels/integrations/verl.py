"""OAR in verl (0.9): the `oar_grpo` advantage estimator and the actor-step hook that feeds it.

Discovery. verl 0.9 imports every `verl.plugins` entry point when `verl` is imported (unless
VERL_USE_EXTERNAL_PLUGINS=none); this package declares one naming this module, whose import
calls `register()`. `VERL_USE_EXTERNAL_MODULES=oar_kernels.integrations.verl` or a plain
import does the same. Then `algorithm.adv_estimator=oar_grpo` selects it through verl's own
`core_algos.get_adv_estimator_fn`.

Where the importance is computed, and why. verl calls an advantage estimator with fixed
fields only (token_level_rewards, response_mask, index, config), and a policy loss with
log-probs, advantages and masks: neither sees the model or the token ids, and OAR-G needs a
forward and an input-embedding backward of the model (OAR-P: forwards of masked copies). So the
importance is computed in the actor step that already runs the current policy over prompt +
response: the old-log-prob step. `add_oar_weights(data, model, tokenizer, config)` there
finds the spans, scores the response tokens and stores Bi-Level weights `oar_weights`
[B, R] in the batch (in answer_joint mode the same pass also yields the old log-probs, see
`response_weights`; verl's FSDP2 actor model is gathered for it). The estimator multiplies
verl's GRPO advantages by them; because verl's `compute_advantage` passes only its fixed
fields, `install_advantage_step()` makes `RayPPOTrainer.fit`'s advantage step call
`compute_oar_advantage(data, config)`, which passes `oar_weights` to the registered estimator.
No policy loss is registered: verl's `vanilla` loss already takes per-token advantages [B, R].

Config keys, under verl's `algorithm.oar` (e.g. `+algorithm.oar.tau=0.3`): see `OARConfig`.
`algorithm.norm_adv_by_std_in_grpo` keeps its meaning. Requires `pip install "oar-kernels[verl]"`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from oar_kernels import pipeline, reshape, spans

NAME = "oar_grpo"
INSTALL_HINT = 'the OAR verl plugin needs verl 0.9: pip install "oar-kernels[verl]"'


@dataclass(frozen=True)
class OARConfig:
    """The `algorithm.oar` keys.

    method: "gradient" (OAR-G), "perturbation" (OAR-P) or "hybrid" (OAR-G ranks, OAR-P
    scores each row's top DEFAULT_TOP_K; opt-in, see `oar_advantages`).
    mode: outcome functional, "answer_joint", "answer_mean" or "last".
    answer_format: how the answer is found in responses (see `oar_kernels.spans`).
    tau, beta, floor, preserve_mass: the Bi-Level reshape (SPEC section 6).
    noise_std: OAR-G noise; None is 0 in answer_joint mode and 1e-3 otherwise (and always
    1e-3 for the hybrid's ranking).
    mask_token_id: OAR-P's (and the hybrid's) substitute token; None is the tokenizer's pad
    token.
    """

    method: str = "gradient"
    mode: str = "answer_joint"
    answer_format: str = "boxed"
    tau: float = reshape.TAU
    beta: float = reshape.BETA
    floor: float = reshape.FLOOR
    preserve_mass: bool = True
    noise_std: float | None = None
    mask_token_id: int | None = None

    def __post_init__(self):
        if self.method not in pipeline.METHODS:
            raise ValueError(f"oar.method must be one of {pipeline.METHODS}, got {self.method!r}")

    @classmethod
    def from_config(cls, config) -> OARConfig:
        """From verl's algorithm config (keys under `oar`), a mapping of the keys, or None."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        # verl's algorithm config is recognised by its adv_estimator key.
        is_algorithm = config.get("adv_estimator") is not None
        section = (config.get("oar") or {}) if is_algorithm else config
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in section if k not in known)
        if unknown:
            raise ValueError(f"unknown algorithm.oar keys {unknown}; known: {sorted(known)}")
        return cls(**{k: section[k] for k in section})


@dataclass
class OARResponse:
    weights: torch.Tensor  # [B, R] float32 Bi-Level weights, 1 outside the reasoning span
    scores: torch.Tensor  # [B, R] float32 importance, 0 outside the reasoning span
    old_log_probs: torch.Tensor  # [B, R] float32 log p(response_t | ...) at temperature 1


def response_weights(
    model, tokenizer, input_ids, attention_mask, response_mask, config=None
) -> OARResponse:
    """OAR weights of the response tokens in verl's layout (the actor-step computation).

    input_ids, attention_mask: [B, P + R] prompt (left padded) then response (right padded);
    response_mask: [B, R] the response's real tokens. config: `OARConfig`, verl's algorithm
    config or a mapping of its keys. The old log-probs are exact in answer_joint mode with no
    noise; they equal verl's only at rollout temperature 1.
    """
    cfg = OARConfig.from_config(config)
    width = response_mask.shape[1]
    completion = torch.zeros_like(attention_mask, dtype=torch.bool)
    completion[:, -width:] = response_mask.bool()
    score_mask, answer_mask = spans.completion_spans(
        tokenizer, input_ids.cpu(), completion.cpu(), answer_format=cfg.answer_format
    )
    mask_id = tokenizer.pad_token_id if cfg.mask_token_id is None else cfg.mask_token_id
    with _unsharded(model):
        out = _oar_advantages(
            model, input_ids, attention_mask, score_mask, answer_mask, cfg, mask_id
        )
    return OARResponse(*(t[:, -width:] for t in (out.weights, out.scores, out.old_logprobs)))


def _oar_advantages(model, input_ids, attention_mask, score_mask, answer_mask, cfg, mask_id):
    return pipeline.oar_advantages(
        model,
        input_ids,
        attention_mask,
        score_mask.to(input_ids.device),
        answer_mask.to(input_ids.device),
        torch.ones(input_ids.shape[0], device=input_ids.device),
        method=cfg.method,
        mode=cfg.mode,
        noise_std=cfg.noise_std,
        mask_token_id=mask_id if cfg.method in pipeline.COUNTERFACTUAL else None,
        tau=cfg.tau,
        beta=cfg.beta,
        floor=cfg.floor,
        preserve_mass=cfg.preserve_mass,
    )


def _unsharded(model):
    """The parameters of the root FSDP2 unit and of the embedding units gathered for the
    duration (verl's FSDP2 actor wraps the root, each layer, and untied embeddings).

    OAR runs the decoder and the head as separate calls and reads the head's weight (it is
    applied to chosen positions only), so the forward hooks that would gather the root's
    parameters (the final norm) and the head's never fire; the layers gather their own.
    """
    import contextlib

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        return contextlib.nullcontext()
    embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
    units = [model] + [m for m in embeddings if isinstance(m, FSDPModule) and m is not model]

    # FSDP2 makes the first unit to run forward the root; before verl's first actor forward
    # that would be the embedding OAR calls, and verl's next forward would then fail.
    lazy_init = getattr(model._get_fsdp_state(), "_lazy_init", None)
    if lazy_init is not None:
        lazy_init()

    @contextlib.contextmanager
    def gathered():
        for unit in units:  # OAR-G's backward must not reshard them before the next pass
            unit.set_reshard_after_backward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_backward(True, recurse=False)  # FSDP2's default
                unit.reshard()

    return gathered()


def add_oar_weights(data, model, tokenizer, config=None):
    """Actor-step hook: stores `oar_weights` [B, R] in a verl `DataProto` and returns it.

    Call it where the actor model is, next to the old-log-prob computation; `data.batch`
    needs input_ids, attention_mask and response_mask (or responses, for R).
    """
    batch = data.batch
    if "response_mask" in batch.keys():
        mask = batch["response_mask"]
    else:
        mask = batch["attention_mask"][:, -batch["responses"].shape[1] :]
    out = response_weights(
        model, tokenizer, batch["input_ids"], batch["attention_mask"], mask, config
    )
    batch["oar_weights"] = out.weights
    return data


def compute_oar_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    config=None,
    oar_weights: torch.Tensor | None = None,
    epsilon: float = 1e-6,
    **_,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `oar_grpo` estimator: verl's GRPO outcome advantages times OAR weights.

    token_level_rewards, response_mask: [B, R]; index: [B] group ids (verl's `uid`).
    oar_weights: [B, R] from `add_oar_weights`. Returns (advantages, returns), both [B, R].
    """
    if oar_weights is None:
        raise ValueError(
            "oar_grpo needs oar_weights [B, R] from the actor step (add_oar_weights); "
            "verl's compute_advantage does not pass them: call install_advantage_step() in the "
            "trainer's process, or compute_oar_advantage(data, config)"
        )
    core_algos = _core_algos()
    norm = True if config is None else config.get("norm_adv_by_std_in_grpo", True)
    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards, response_mask, index, epsilon=epsilon, norm_adv_by_std_in_grpo=norm
    )
    per_token = reshape.weigh_advantages(advantages, oar_weights.to(advantages.device))
    return per_token, per_token


def compute_oar_advantage(data, config=None):
    """verl's `compute_advantage` for `oar_grpo`: looks the estimator up in verl's registry and
    passes it the batch's `oar_weights`; writes `advantages` and `returns` [B, R]."""
    estimator = _core_algos().get_adv_estimator_fn(NAME)
    batch = data.batch
    advantages, returns = estimator(
        token_level_rewards=batch["token_level_rewards"],
        response_mask=batch["response_mask"],
        index=data.non_tensor_batch["uid"],
        config=config,
        oar_weights=batch["oar_weights"],
    )
    batch["advantages"], batch["returns"] = advantages, returns
    return data


def install_advantage_step() -> None:
    """Makes verl's trainer advantage step pass `oar_weights` to `oar_grpo` (idempotent).

    `RayPPOTrainer.fit` calls the module function `verl.trainer.ppo.ray_trainer.compute_advantage`,
    which hands an estimator its fixed fields only; this replaces it, in the calling process (the
    driver, where fit runs), by one that sends `oar_grpo` to `compute_oar_advantage` and every
    other estimator to verl's own.
    """
    import inspect

    try:
        from verl.trainer.ppo import ray_trainer
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    verl_step = ray_trainer.compute_advantage
    if getattr(verl_step, "oar_routed", False):
        return
    signature = inspect.signature(verl_step)

    def compute_advantage(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        if given["adv_estimator"] != NAME:
            return verl_step(*args, **kwargs)
        config = given["config"]
        if config is None:
            config = {"norm_adv_by_std_in_grpo": given["norm_adv_by_std_in_grpo"]}
        return compute_oar_advantage(given["data"], config)

    compute_advantage.oar_routed = True
    compute_advantage.__doc__ = verl_step.__doc__
    ray_trainer.compute_advantage = compute_advantage


def _core_algos():
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return core_algos


def register() -> None:
    """Registers `oar_grpo` in verl's advantage-estimator registry (idempotent)."""
    _core_algos().register_adv_est(NAME)(compute_oar_grpo_advantage)


try:  # verl's entry-point discovery imports this module: registering is the import's job
    register()
except ImportError:  # without verl the helpers above still work; register() says what's missing
    pass
