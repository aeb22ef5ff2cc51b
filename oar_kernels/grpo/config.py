"""`TrainConfig`: every knob of a reference GRPO run, from flags or a YAML file."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

from oar_kernels.grpo.model import ModelSpec
from oar_kernels.grpo.rollout import BACKENDS
from oar_kernels.importance.batch import MODES as OAR_MODES
from oar_kernels.loss import LOSS_TYPES
from oar_kernels.reshape import MAX_BETA

# OAR methods and their controls: "-shuffled" permutes each row's OAR weights at random
# within its scored span, "-inverted" gives the token of the k-th largest weight the k-th
# smallest; both keep the row's multiset of weights and break its alignment with the scores.
IMPORTANCE = {"oar-g": "gradient", "oar-p": "perturbation"}
CONTROLS = ("shuffled", "inverted")
METHODS = ("grpo", *IMPORTANCE, *(f"{m}-{c}" for m in IMPORTANCE for c in CONTROLS))
TASKS = ("addition", "filler")
SCALE_REWARDS = ("group", "batch", "none")
DEVICES = ("auto", "cpu", "cuda")
HEADS = ModelSpec.num_heads
RUN_CONFIG = "config.yaml"  # a run's config, in its out_dir
# Fields added since runs were first saved, with the value a run saved before ran with.
FIELDS_ADDED = {"warmup_updates": 0}
# Field annotations are strings (postponed evaluation): the types they name.
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class ConfigError(ValueError):
    """A run that cannot start as asked: a bad key or value, a missing checkpoint."""


def _field(default, help: str):
    """A TrainConfig field and its help text (`oar-kernels train --help` shows it)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """A reference GRPO run on the embedded arithmetic task (`oar-kernels train --help`).

    Every field is checked on construction (type, range, finiteness), so a run that would
    fail on a value fails before its warm start, with a ConfigError naming the field.
    """

    method: str = _field(
        "oar-g",
        "what weighs the group advantage per token: nothing (grpo), gradient saliency (oar-g), "
        "counterfactual masking (oar-p); the -shuffled and -inverted controls permute the OAR "
        "weights within each row",
    )
    seed: int = _field(0, "fixes the run's prompts and samples (not the warm start)")
    steps: int = _field(
        30, "optimizer batches; each one: rollouts, advantages, num_iterations updates"
    )
    out_dir: str = _field(
        "runs/train", "where config.yaml, metrics.jsonl, samples.jsonl, checkpoint.pt go"
    )
    # rollouts
    prompts_per_step: int = _field(8, "problems drawn per step")
    num_generations: int = _field(8, "completions sampled per problem (the GRPO group)")
    temperature: float = _field(1.0, "sampling temperature of rollouts, loss and evaluation")
    max_new_tokens: int = _field(
        128, "completion budget, beyond the filler task's fillers (which get room of their own)"
    )
    rollout_backend: str = _field(
        "hf", "samples with transformers generate (hf) or vllm (the vllm extra, CUDA)"
    )
    # GRPO update
    scale_rewards: str = _field(
        "group", "divide each advantage by its group's reward std, the batch's, or none"
    )
    loss_type: str = _field("dapo", "the loss's normaliser, as TRL's loss_type")
    num_iterations: int = _field(2, "PPO epochs over each batch, against the rollout's logprobs")
    lr: float = _field(1e-4, "AdamW learning rate (after the warmup)")
    warmup_updates: int = _field(
        10,
        "optimizer updates over which the learning rate rises linearly to lr (0: none); "
        "AdamW's first update moves every weight by about lr whatever its gradient, which "
        "without a warmup makes step 1's kl_to_old ~1.9 against <= 0.002 later",
    )
    epsilon_low: float = _field(0.2, "the ratio is clipped below at 1 - epsilon_low")
    epsilon_high: float = _field(0.2, "the ratio is clipped above at 1 + epsilon_high")
    kl_beta: float = _field(0.0, "weight of the k3 KL to the warm-started reference model")
    max_grad_norm: float = _field(1.0, "gradients are clipped to this total norm")
    # OAR (SPEC sections 3-6)
    oar_mode: str = _field(
        "answer_joint", "the outcome OAR-G's saliency differentiates (gradient_importance's mode)"
    )
    reshape_tau: float = _field(
        0.25, "Bi-Level reshape: the score quantile below which tokens are damped"
    )
    reshape_beta: float = _field(
        1.0, "Bi-Level reshape: tokens above the quantile weigh up to 1 + beta"
    )
    reshape_floor: float = _field(
        0.1, "Bi-Level reshape: a damped token's least weight (before mass renormalisation)"
    )
    # task, model, warm start
    task: str = _field(
        "addition", "filler: the addition with `fillers` characters before each step"
    )
    fillers: int = _field(24, "filler characters before each column step and 'So' (task filler)")
    digits: int = _field(3, "digits of each operand")
    hidden_size: int = _field(128, "the policy's width")
    num_layers: int = _field(2, "the policy's transformer layers")
    warm_start_accuracy: float = _field(
        0.8, "supervised warm start until greedy validation accuracy reaches this"
    )
    warm_start_max_steps: int = _field(
        600, "the warm start stops here even below warm_start_accuracy"
    )
    # bookkeeping
    eval_size: int = _field(128, "held-out problems (the same for every run)")
    eval_samples: int = _field(4, "samples per held-out problem for sampled pass@1")
    eval_every: int = _field(10, "evaluate every this many steps (and at the last)")
    checkpoint_every: int = _field(10, "save checkpoint.pt every this many steps (and at the last)")
    heatmap_samples: int = _field(6, "completions whose token weights are kept per eval step")
    device: str = _field("auto", "where the policy runs (auto: cuda if available)")
    progress: bool = _field(True, "progress bars")

    def __post_init__(self) -> None:
        for knob in fields(self):
            value = _coerce(knob.name, knob.type, getattr(self, knob.name))
            setattr(self, knob.name, value)
            _check_value(knob.name, value)
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
        """The file's keys (field names or flag names: `out_dir` or `out-dir`), then
        `overrides`."""
        return cls.from_dict({**read_yaml(path), **overrides})

    @classmethod
    def of_run(cls, out_dir: str | Path, **overrides) -> TrainConfig:
        """The config the run in `out_dir` was started with (its config.yaml, if any: else
        the defaults), `overrides` applied, out_dir set to `out_dir`: what `--resume`
        continues. Whether the checkpoint there fits it is the trainer's check."""
        path = Path(out_dir) / RUN_CONFIG
        saved = {**FIELDS_ADDED, **read_yaml(path)} if path.exists() else {}
        return cls.from_dict({**saved, **overrides, "out_dir": str(out_dir)})

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
    "warmup_updates": _Range(0),
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


def read_yaml(path: str | Path) -> dict:
    """A YAML file of config keys as field names (`out-dir` read as `out_dir`), its float
    fields' values as numbers; a ConfigError if it cannot be read or is no such mapping."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    named = {}
    for key, value in values.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in named:
            raise ConfigError(f"config file {path} sets {name} twice (as {key!r} too)")
        named[name] = value
    return _yaml_floats(named)


def choices_of(name: str) -> tuple[str, ...] | None:
    """The values a field may take, for a field with a fixed set of them."""
    return _CHOICES.get(name)


def flag_help(name: str) -> str:
    """A field's help text with its range and default, for `--help` (which shows a
    field's choices as the flag's metavar)."""
    knob = next(f for f in fields(TrainConfig) if f.name == name)
    allowed = f"{_RANGES[name]}; " if name in _RANGES else ""
    return f"{knob.metadata['help']} ({allowed}default {knob.default})"


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
