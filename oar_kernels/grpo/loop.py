"""The reference GRPO loop: rollouts, rewards, group advantages, OAR, the fused loss.

One step (`_train_step`):
  1. draw `prompts_per_step` problems and sample `num_generations` completions of each;
  2. reward each completion (exact answer match) and normalise within its group;
  3. per-token advantages: GRPO broadcasts A_i; OAR-G / OAR-P weigh it by token importance
     (`oar_kernels.oar_advantages`), with spans from `oar_kernels.spans`;
  4. `num_iterations` PPO updates with `oar_kernels.grpo_loss` straight from hidden states;
     the first one's logprobs (same weights as the rollout) are the old logprobs.

Every random draw of step k is seeded from (seed, k), and checkpoints hold the model and
optimizer, so a resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import torch

import oar_kernels as ok
from oar_kernels.grpo import model as policy
from oar_kernels.grpo.config import ConfigError, TrainConfig
from oar_kernels.grpo.rollout import Rollouts, make_rollouts
from oar_kernels.grpo.task import build_tokenizer, make_dataset, make_problem, reward
from oar_kernels.importance.gradient import (
    clean_sequence_logprobs,
    lm_head_parameters,
    position_ids_from,
)
from oar_kernels.pipeline import weight_statistics

HELD_OUT_SEED = 1_000_003  # the held-out problems are the same for every run
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    start_accuracy: float  # held-out sampled pass@1 of the warm start
    final_accuracy: float  # ... after the last step
    start_greedy: float  # held-out greedy accuracy
    final_greedy: float


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """A_i = r_i - mean of its group, divided by the group's std, the batch's, or nothing.

    rewards: [N], groups contiguous; returns [N] float32. A group with equal rewards gets 0.
    """
    grouped = rewards.float().view(-1, group_size)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(1, keepdim=True).expand_as(grouped).flatten()
    elif scale == "batch":
        std = rewards.float().std().expand_as(centred)
    else:
        return centred
    return centred / (std + 1e-4)


def _step_seed(config: TrainConfig, step: int) -> int:
    return config.seed * 1_000_003 + step


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    return torch.device(config.device)


class Trainer:
    """Holds the policy, optimizer and rollout backend of one run; `run()` trains it."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False):
        self.config, self.out = config, Path(config.out_dir)
        self.device = _device(config)
        # Checked before the warm start's minute.
        if resume and not (self.out / CHECKPOINT).exists():
            raise ConfigError(f"--resume: no checkpoint at {self.out / CHECKPOINT}")
        if not (resume or overwrite) and (self.out / METRICS).exists():
            raise ConfigError(
                f"{self.out} already holds a run: --resume continues it, --overwrite replaces "
                "it, or choose another --out-dir"
            )
        self.tokenizer = build_tokenizer()
        spec = policy.ModelSpec(hidden_size=config.hidden_size, num_layers=config.num_layers)
        warm = policy.WarmStart(
            target_accuracy=config.warm_start_accuracy,
            max_steps=config.warm_start_max_steps,
            digits=config.digits,
        )
        model = policy.warm_started_model(self.tokenizer, spec, warm, progress=config.progress)
        self.model = model.to(self.device)
        self.reference = None
        if config.kl_beta > 0:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.held_out = make_dataset(config.eval_size, HELD_OUT_SEED, config.digits)
        self.held_out_prompts = [policy.prompt_ids(self.tokenizer, p) for p in self.held_out]
        self.step = 0
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_checkpoint()
        else:
            for name in (METRICS, SAMPLES, CHECKPOINT):
                (self.out / name).unlink(missing_ok=True)
        import yaml

        (self.out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.rollouts = make_rollouts(
            config.rollout_backend,
            self.model,
            self.tokenizer,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            workdir=self.out / "rollout-model",
        )

    # -- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.out / CHECKPOINT
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
        }
        policy.save_atomically(state, path)
        return path

    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        state = torch.load(path, map_location=self.device, weights_only=True)
        # Everything but the step budget and the bookkeeping must match, or the continuation
        # would not be the same run.
        free = {"steps", "progress", "out_dir", "eval_every", "checkpoint_every"}
        saved, asked = state["config"], self.config.to_dict()
        changed = sorted(k for k in asked if k not in free and saved.get(k) != asked[k])
        if changed:
            raise ConfigError(f"--resume: the checkpoint was trained with other {changed}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        for name in (METRICS, SAMPLES):  # drop records written after the checkpoint
            _truncate_jsonl(self.out / name, self.step)

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy: `eval_accuracy` is pass@1 over `eval_samples` samples per
        problem at the training temperature (fixed seed), `eval_greedy` greedy decoding.

        Sampled pass@1 is the headline: it is what GRPO optimises, and a warm start that is
        right greedily on 90% of problems is right on about half of its samples, so the
        sampled number has room to rise where the greedy one has little.
        """
        k = self.config.eval_samples
        greedy = self.rollouts.generate(self.held_out_prompts, greedy=True, seed=0)
        repeated = [p for p in self.held_out_prompts for _ in range(k)]
        sampled = self.rollouts.generate(repeated, seed=HELD_OUT_SEED)
        answers = [p.answer for p in self.held_out]
        samples_of = [a for a in answers for _ in range(k)]
        return {
            "eval_accuracy": fmean(reward(t, a) for t, a in zip(sampled.texts, samples_of)),
            "eval_greedy": fmean(reward(t, a) for t, a in zip(greedy.texts, answers)),
        }

    # -- training --------------------------------------------------------------------------
    def run(self) -> RunResult:
        from tqdm.auto import tqdm

        config = self.config
        if self.step == 0:
            self._log(METRICS, {"step": 0, **self.evaluate()})
        bar = tqdm(
            range(self.step + 1, config.steps + 1),
            desc=f"{config.method} seed {config.seed}",
            initial=self.step,
            total=config.steps,
            disable=not config.progress,
        )
        try:
            for step in bar:
                record = self._train_step(step)
                self.step = step
                if step % config.eval_every == 0 or step == config.steps:
                    record.update(self.evaluate())
                self._log(METRICS, record)
                if step % config.checkpoint_every == 0 or step == config.steps:
                    self.save_checkpoint()
                bar.set_postfix(reward=f"{record['reward']:.2f}")
        except KeyboardInterrupt:
            if self.step > 0:
                path = self.save_checkpoint()
                print(f"\ninterrupted: saved step {self.step} to {path}; continue with --resume")
            raise
        finally:
            bar.close()
        evals = [r for r in read_jsonl(self.out / METRICS) if "eval_accuracy" in r]
        return RunResult(
            self.out,
            self.step,
            evals[0]["eval_accuracy"],
            evals[-1]["eval_accuracy"],
            evals[0]["eval_greedy"],
            evals[-1]["eval_greedy"],
        )

    def _train_step(self, step: int) -> dict:
        config, seed = self.config, _step_seed(self.config, step)
        rng = random.Random(seed)
        problems = [make_problem(rng, config.digits) for _ in range(config.prompts_per_step)]
        group = config.num_generations
        once = [policy.prompt_ids(self.tokenizer, p) for p in problems]
        prompts = [ids for ids in once for _ in range(group)]
        answers = [p.answer for p in problems for _ in range(group)]

        began = time.perf_counter()
        rollouts = self.rollouts.generate(prompts, seed=seed)
        rewards = torch.tensor([reward(t, a) for t, a in zip(rollouts.texts, answers)])
        advantages = group_advantages(rewards, group, config.scale_rewards)
        rolled = time.perf_counter()
        batch = self._batch(rollouts)
        per_token, weights = self._token_advantages(batch, advantages.to(self.device), seed)
        weighed = time.perf_counter()
        update = self._update(batch, per_token)
        self.rollouts.sync_weights()
        done = time.perf_counter()

        completion = batch["completion_mask"]
        record = {
            "step": step,
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item(),
            "solved_groups": (rewards.view(-1, group).max(1).values > 0).float().mean().item(),
            "completion_length": completion.sum(1).float().mean().item(),
            **update,
            "rollout_s": rolled - began,
            "advantage_s": weighed - rolled,
            "update_s": done - weighed,
        }
        if weights is not None:
            record.update(weight_statistics(weights, batch["score_mask"]))
            if step % config.eval_every == 0 or step == 1:
                self._log_samples(step, batch, weights, rewards, advantages)
        return record

    def _batch(self, rollouts: Rollouts) -> dict:
        score_mask, answer_mask = ok.spans.completion_spans(
            self.tokenizer, rollouts.input_ids, rollouts.completion_mask, answer_format="boxed"
        )
        tensors = {
            "input_ids": rollouts.input_ids,
            "attention_mask": rollouts.attention_mask,
            "completion_mask": rollouts.completion_mask,
            "score_mask": score_mask,
            "answer_mask": answer_mask,
        }
        return {k: v.to(self.device) for k, v in tensors.items()}

    def _token_advantages(self, batch: dict, advantages: torch.Tensor, seed: int):
        """Per-token advantages [N, T] and the Bi-Level weights (None for plain GRPO)."""
        config = self.config
        if config.method == "grpo":
            return advantages[:, None].expand(batch["input_ids"].shape), None
        generator = torch.Generator(device=self.device).manual_seed(seed)
        result = ok.oar_advantages(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["score_mask"],
            batch["answer_mask"],
            advantages,
            method="gradient" if config.method == "oar-g" else "perturbation",
            mode=config.oar_mode,
            mask_token_id=self.tokenizer.pad_token_id,
            generator=generator,
            tau=config.reshape_tau,
            beta=config.reshape_beta,
            floor=config.reshape_floor,
        )
        return result.advantages, result.weights

    def _update(self, batch: dict, per_token: torch.Tensor) -> dict:
        config = self.config
        ids, attention = batch["input_ids"], batch["attention_mask"]
        # Position t's hidden state predicts token t + 1: shift targets, masks, advantages.
        targets, mask = ids[:, 1:], batch["completion_mask"][:, 1:]
        advantages = per_token[:, 1:]
        reference = None
        if self.reference is not None:
            reference = clean_sequence_logprobs(self.reference, ids, attention)[:, 1:]
        weight, bias = lm_head_parameters(self.model)
        old, metrics = None, {}
        for iteration in range(config.num_iterations):
            hidden = self.model.get_decoder()(
                input_ids=ids,
                attention_mask=attention.long(),
                position_ids=position_ids_from(attention.long()),
                use_cache=False,
            ).last_hidden_state
            result = ok.grpo_loss(
                hidden[:, :-1],
                weight,
                targets,
                advantages,
                mask,
                old_logprobs=old,
                ref_logprobs=reference,
                bias=bias,
                loss_type=config.loss_type,
                epsilon_low=config.epsilon_low,
                epsilon_high=config.epsilon_high,
                beta=config.kl_beta,
                temperature=config.temperature,
            )
            self.optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), config.max_grad_norm
            )
            self.optimizer.step()
            if old is None:  # same weights as the rollout: these are the old logprobs
                old = result.logprobs.detach()
                on_mask = old[mask.bool()]
                metrics["entropy"] = -on_mask.mean().item() if on_mask.numel() else 0.0
        drift = result.logprobs.detach() - old  # last iteration, before its update
        k3 = torch.exp(-drift) + drift - 1
        metrics.update(
            loss=result.loss.item(),
            clip_fraction=result.clip_fraction.item(),
            kl_to_old=k3[mask.bool()].mean().item() if mask.any() else 0.0,
            grad_norm=grad_norm.item(),
        )
        if self.reference is not None:
            metrics["kl_to_ref"] = result.mean_kl.item()
        return metrics

    def _log_samples(self, step, batch, weights, rewards, advantages) -> None:
        """A few completions with their token weights, for `viz`'s heatmap."""
        for row in range(min(self.config.heatmap_samples, weights.shape[0])):
            cols = batch["completion_mask"][row].nonzero().flatten().tolist()
            ids = batch["input_ids"][row, cols].tolist()
            self._log(
                SAMPLES,
                {
                    "step": step,
                    "method": self.config.method,
                    "reward": rewards[row].item(),
                    "advantage": advantages[row].item(),
                    "tokens": [self.tokenizer.decode([i]) for i in ids],
                    "weights": [round(w, 4) for w in weights[row, cols].tolist()],
                    "scored": batch["score_mask"][row, cols].tolist(),
                },
            )

    def _log(self, name: str, record: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _truncate_jsonl(path: Path, last_step: int) -> None:
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train one run; writes config.yaml, metrics.jsonl, samples.jsonl and checkpoint.pt
    under config.out_dir (see `oar_kernels.grpo.viz` for the pictures). An out_dir that
    already holds a run is continued with resume=True, replaced with overwrite=True, and
    otherwise a ConfigError."""
    return Trainer(config, resume=resume, overwrite=overwrite).run()
