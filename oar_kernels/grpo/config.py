"""`TrainConfig`: every knob of a reference GRPO run, from flags or a YAML file."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

from oar_kernels.grpo.model import ModelSpec
from oar_kernels.grpo.rollout import BACKENDS
from oar_kernels.reshape import MAX_BETA

# OAR methods and their controls: "-shuffled" permutes each row's OAR weights at random
# within its scored span, "-inverted" gives the token of the k-th largest weight the k-th
# smallest; both keep the row's multiset of weights and break its alignment with the scores.
IMPORTANCE = {"oar-g": "gradient", "oar-p": "perturbation"}
CONTROLS = ("shuffled", "inverted")
METHODS = ("grpo", *IMPORTANCE, *(f"{m}-{c}" for m in IMPORTANCE for c in CONTROLS))
TASKS = ("addition", "filler")
SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
OAR_MODES = ("answer_joint", "answer_mean", "last")
DEVICES = ("auto", "cpu", "cuda")
HEADS = ModelSpec.num_heads
# Field annotations are strings (postponed evaluation): the types they name.
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class ConfigError(ValueError):
    """A run that cannot start as asked: a bad key or value, a missing checkpoint."""


@dataclass
class TrainConfig:
    """A reference GRPO run on the embedded arithmetic task (`oar-kernels train --help`).

    Every field is checked on construction (type, range, finiteness), so a run that would
    fail on a value fails before its warm start, with a ConfigError naming the field.
    """

    # grpo | oar-g (gradient saliency) | oar-p (counterfactual masking) | their controls
    # oar-g-shuffled, oar-p-shuffled, oar-g-inverted, oar-p-inverted (weights permuted)
    method: str = "oar-g"
    seed: int = 0
    steps: int = 30  # optimizer batches (each: rollouts, advantages, num_iterations updates)
    out_dir: str = "runs/train"
    # rollouts
    prompts_per_step: int = 8
    num_generations: int = 8  # completions per prompt (the GRPO group)
    temperature: float = 1.0
    max_new_tokens: int = 128  # beyond the filler task's fillers, which get room of their own
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
    task: str = "addition"  # addition | filler (the addition with `fillers` per step)
    fillers: int = 24  # filler characters before each column step and "So" (task filler)
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
        for field in fields(self):
            value = _coerce(field.name, field.type, getattr(self, field.name))
            setattr(self, field.name, value)
            _check_value(field.name, value)
        if self.hidden_size % (2 * HEADS):
            raise ConfigError(
                f"hidden_size must be a multiple of {2 * HEADS} ({HEADS} attention heads, each "
                f"of an even width for the rotary embedding), got {self.hidden_size}"
            )
        if self.rollout_backend == "vllm" and self.device == "cpu":
            raise ConfigError("rollout_backend='vllm' needs device 'cuda' or 'auto', not 'cpu'")

    @property
    def filler_count(self) -> int:
        """F of the task as run: `fillers` for the filler task, 0 for plain addition."""
        return self.fillers if self.task == "filler" else 0

    @property
    def importance(self) -> str | None:
        """The OAR estimator of `method` (gradient or perturbation); None for GRPO."""
        return IMPORTANCE.get(self.method[:5]) if self.method != "grpo" else None

    @property
    def control(self) -> str | None:
        """shuffled or inverted for a control method, else None."""
        suffix = self.method[6:]
        return suffix if suffix in CONTROLS else None

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Checked construction: unknown keys and wrongly typed values are a ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"a config must be a mapping of keys to values, got {values!r}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(map(str, unknown))}")
        return cls(**values)

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
        return cls.from_dict({**_yaml_floats(values), **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Range:
    """The values a numeric field may take: from `low` (excluded if `open_low`) to `high`."""

    low: float
    high: float = math.inf
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and value <= self.high

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {self.low}"
        return f"in {'(' if self.open_low else '['}{self.low}, {self.high}]"


# Every numeric field's range; a float must also be finite. The bounds that are not plain
# counts say why they are where they are.
_RANGES = {
    # Step k seeds its draws with seed * 1_000_003 + k, which torch's generator must hold.
    "seed": _Range(0, 2**32 - 1),
    "steps": _Range(1),
    "prompts_per_step": _Range(1),
    "num_generations": _Range(2),  # a group: advantages compare completions of one prompt
    "max_new_tokens": _Range(1),
    "num_iterations": _Range(1),
    "digits": _Range(1),
    "fillers": _Range(0),
    "hidden_size": _Range(2 * HEADS),
    "num_layers": _Range(1),
    "warm_start_max_steps": _Range(0),
    "eval_size": _Range(1),
    "eval_samples": _Range(1),
    "eval_every": _Range(1),
    "checkpoint_every": _Range(1),
    "heatmap_samples": _Range(0),
    # Logits are divided by the temperature in float32: below 0.01 sampling is greedy in
    # all but name (a logit gap of 0.1 becomes odds of e^10), so a group's completions
    # agree and its advantages vanish, while the loss's logprobs scale float32 rounding by
    # 1/temperature. grpo_loss itself refuses values below 1e-6.
    "temperature": _Range(1e-2),
    "lr": _Range(0, open_low=True),
    # The ratio is clipped below at 1 - epsilon_low, which must not be negative (grpo_loss
    # refuses it); 1 means no lower clip.
    "epsilon_low": _Range(0, 1),
    "epsilon_high": _Range(0),
    "kl_beta": _Range(0),
    "max_grad_norm": _Range(0, open_low=True),  # 0 would zero every gradient
    "reshape_tau": _Range(0, 1),
    "reshape_beta": _Range(0, MAX_BETA),  # reshape's own bound: larger overflows float32
    "reshape_floor": _Range(0, 1),
    "warm_start_accuracy": _Range(0, 1),
}
_CHOICES = {
    "method": METHODS,
    "task": TASKS,
    "scale_rewards": SCALE_REWARDS,
    "loss_type": LOSS_TYPES,
    "oar_mode": OAR_MODES,
    "rollout_backend": BACKENDS,
    "device": DEVICES,
}


def _yaml_floats(values: dict) -> dict:
    """YAML 1.1 (PyYAML) reads `1e-4` as a string (its floats need a dot, `1.0e-4`): float
    fields take such strings as the numbers they spell."""
    types = field_types()
    parsed = dict(values)
    for name, value in values.items():
        if types.get(name) is float and isinstance(value, str):
            try:
                parsed[name] = float(value)
            except ValueError:
                pass  # left as it is: _coerce names the field and the bad value
    return parsed


def _coerce(name: str, annotation: str, value):
    """`value` as the field's type: an int stands for a float, nothing else converts."""
    kind = _TYPES[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name} must be {annotation}, got {value!r}")
    return value


def _check_value(name: str, value) -> None:
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    if name == "out_dir" and not value.strip():
        raise ConfigError("out_dir must name a directory, got an empty string")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if name in _RANGES and value not in _RANGES[name]:
        raise ConfigError(f"{name} must be {_RANGES[name]}, got {value}")


def field_types() -> dict[str, type]:
    """Each field's Python type, for building command-line flags."""
    return {f.name: _TYPES[f.type] for f in fields(TrainConfig)}
