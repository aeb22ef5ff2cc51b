"""`TrainConfig`: every knob of a reference GRPO run, from flags or a YAML file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from oar_kernels.grpo.rollout import BACKENDS

METHODS = ("grpo", "oar-g", "oar-p")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
OAR_MODES = ("answer_joint", "answer_mean", "last")
DEVICES = ("auto", "cpu", "cuda")
# Field annotations are strings (postponed evaluation): the types they name.
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class ConfigError(ValueError):
    """A run that cannot start as asked: a bad key or value, a missing checkpoint."""


@dataclass
class TrainConfig:
    """A reference GRPO run on the embedded arithmetic task (`oar-kernels train --help`)."""

    method: str = "oar-g"  # grpo | oar-g (gradient saliency) | oar-p (counterfactual masking)
    seed: int = 0
    steps: int = 30  # optimizer batches (each: rollouts, advantages, num_iterations updates)
    out_dir: str = "runs/train"
    # rollouts
    prompts_per_step: int = 8
    num_generations: int = 8  # completions per prompt (the GRPO group)
    temperature: float = 1.0
    max_new_tokens: int = 128
    rollout_backend: str = "hf"  # hf (transformers generate) | vllm (the vllm extra, CUDA)
    # GRPO update
    scale_rewards: str = "group"  # divide by the group's reward std, the batch's, or none
    loss_type: str = "dapo"
    num_iterations: int = 2  # PPO epochs over each batch, against the rollout's logprobs
    lr: float = 1e-4
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    kl_beta: float = 0.0  # weight of the k3 KL to the warm-started reference model
    max_grad_norm: float = 1.0
    # OAR (SPEC sections 3-6)
    oar_mode: str = "answer_joint"
    reshape_tau: float = 0.25
    reshape_beta: float = 1.0
    reshape_floor: float = 0.1
    # task, model, warm start
    digits: int = 3
    hidden_size: int = 128
    num_layers: int = 2
    warm_start_accuracy: float = 0.8  # supervised warm start until this (greedy)
    warm_start_max_steps: int = 600
    # bookkeeping
    eval_size: int = 128  # held-out problems
    eval_samples: int = 4  # samples per held-out problem for sampled pass@1
    eval_every: int = 10
    checkpoint_every: int = 10
    heatmap_samples: int = 6  # completions whose token weights are kept per eval step
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        choices = {
            "method": METHODS,
            "scale_rewards": SCALE_REWARDS,
            "loss_type": LOSS_TYPES,
            "oar_mode": OAR_MODES,
            "rollout_backend": BACKENDS,
            "device": DEVICES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "steps",
            "prompts_per_step",
            "max_new_tokens",
            "num_iterations",
            "digits",
            "hidden_size",
            "num_layers",
            "eval_size",
            "eval_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (a group), got {self.num_generations}")
        for name in ("temperature", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("epsilon_low", "epsilon_high", "kl_beta", "max_grad_norm", "reshape_beta"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.reshape_tau <= 1 or not 0 <= self.reshape_floor <= 1:
            raise ConfigError("reshape_tau and reshape_floor must lie in [0, 1]")
        if self.heatmap_samples < 0 or self.warm_start_max_steps < 0:
            raise ConfigError("heatmap_samples and warm_start_max_steps must be >= 0")
        if not 0 <= self.warm_start_accuracy <= 1:
            raise ConfigError(
                f"warm_start_accuracy must lie in [0, 1], got {self.warm_start_accuracy}"
            )
        if self.hidden_size % 4:
            raise ConfigError(
                f"hidden_size must be a multiple of 4 (heads), got {self.hidden_size}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Checked construction: unknown keys and wrongly typed values are a ValueError."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {values!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(map(str, unknown))}")
        return cls(**{k: _coerce(k, known[k].type, v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> TrainConfig:
        import yaml

        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as error:
            raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, annotation: str, value):
    kind = _TYPES[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {annotation}, got {value!r}")
    return value


def field_types() -> dict[str, type]:
    """Each field's Python type, for building command-line flags."""
    return {f.name: _TYPES[f.type] for f in fields(TrainConfig)}
