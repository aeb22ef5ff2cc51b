"""The reference GRPO loop: rollouts, rewards, group advantages, OAR, the fused loss.

One step (`_train_step`):
  1. draw `prompts_per_step` problems and sample `num_generations` completions of each;
  2. reward each completion (exact answer match) and normalise within its group;
  3. per-token advantages: GRPO broadcasts A_i; OAR-G / OAR-P weigh it by token importance
     (`oar_kernels.oar_advantages`), with spans from `oar_kernels.spans`;
  4. `num_iterations` PPO updates with `oar_kernels.grpo_loss` straight from hidden states;
     the first one's logprobs (same weights as the rollout) are the old logprobs. The
     learning rate rises linearly over the first `warmup_updates` updates (`_warmed_lr`).

Every random draw of step k is seeded from (seed, k), and checkpoints hold the model and
optimizer, so a resumed run continues bit-identically on CPU.

A step is finished when its record is in metrics.jsonl (`Trainer._finish_step`, the one
place records are written); checkpoints, the one saved on Ctrl-C included, hold the state
of a finished step, and resuming drops the records of later steps. So a run interrupted at
any point and resumed writes the same metrics as one that never stopped. A run holds an
exclusive lock on its out_dir (`train.lock`, naming its process), so two runs never share
one.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import random
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import torch

from oar_kernels.grpo import faithfulness
from oar_kernels.grpo import model as policy
from oar_kernels.grpo.config import FIELDS_ADDED, ConfigError, TrainConfig
from oar_kernels.grpo.controls import permute_weights
from oar_kernels.grpo.rollout import Rollouts, make_rollouts, vllm_unavailable
from oar_kernels.grpo.task import (
    FILLERS,
    build_tokenizer,
    filler_tokens,
    make_dataset,
    make_problem,
    reward,
)
from oar_kernels.importance.causal_lm import (
    clean_sequence_logprobs,
    lm_head_parameters,
    position_ids_from,
)
from oar_kernels.loss import grpo_loss
from oar_kernels.pipeline import oar_advantages, weight_statistics
from oar_kernels.spans import completion_spans

HELD_OUT_SEED = 1_000_003  # the held-out problems are the same for every run
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
LOCK = "train.lock"
CHECKPOINT_KEYS = ("step", "model", "optimizer", "config")
# Fields a resumed run may change: the step budget and the bookkeeping. Any other change
# would make the continuation a different run.
RESUMABLE_CHANGES = {"steps", "progress", "out_dir", "eval_every", "checkpoint_every"}


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
    """Holds the policy, optimizer and rollout backend of one run; `run()` trains it.

    Everything that can refuse the run (the config, the device, out_dir, the checkpoint to
    resume) is checked before the warm start's minute. From construction until `run()`
    returns or raises (or `close()`) the trainer holds out_dir's lock: a second trainer
    there is a ConfigError naming the holder's process.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, overwrite: bool = False):
        self.config, self.out = config, Path(config.out_dir)
        self.device = _device(config)
        _check_rollout_backend(config)
        if resume and not (self.out / CHECKPOINT).exists():
            raise ConfigError(f"--resume: no checkpoint at {self.out / CHECKPOINT}")
        self._lock = _lock_out_dir(self.out)
        try:
            saved = self._claim_out_dir(resume, overwrite)
            self._build(saved)
        except BaseException:
            self.close()
            raise

    def _claim_out_dir(self, resume: bool, overwrite: bool) -> dict | None:
        """Check out_dir against the mode, write config.yaml; the checkpoint when resuming."""
        saved = None
        if resume:
            saved = _read_checkpoint(self.out / CHECKPOINT, self.device, self.config)
        elif not overwrite and (self.out / METRICS).exists():
            raise ConfigError(
                f"{self.out} already holds a run: --resume continues it, --overwrite replaces "
                "it, or choose another --out-dir"
            )
        import yaml

        with _out_dir_errors(self.out):
            if resume:  # drop the records of steps after the checkpoint's
                _rewind_metrics(self.out / METRICS, saved["step"])
                _rewind_jsonl(self.out / SAMPLES, saved["step"])
            else:
                for name in (METRICS, SAMPLES, CHECKPOINT):
                    (self.out / name).unlink(missing_ok=True)
            config_text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
            _write_text_atomically(self.out / "config.yaml", config_text)
        return saved

    def _build(self, saved: dict | None) -> None:
        """The warm-started policy, optimizer and rollouts; restored from `saved` if given."""
        config = self.config
        self.tokenizer = build_tokenizer()
        self.model = warm_start(config, self.tokenizer).to(self.device)
        self.reference = None
        if config.kl_beta > 0:
            self.reference = copy.deepcopy(self.model).requires_grad_(False)
        self.filler_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(FILLERS)))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.0)
        self.held_out = make_dataset(config.eval_size, HELD_OUT_SEED, config.digits)
        self.held_out_prompts = [policy.prompt_ids(self.tokenizer, p) for p in self.held_out]
        self.step = 0
        self.finished = None  # the state of the last finished step, for checkpoints
        if saved is not None:
            self._restore(saved)
        self.rollouts = make_rollouts(
            config.rollout_backend,
            self.model,
            self.tokenizer,
            max_new_tokens=config.max_new_tokens
            + filler_tokens(config.digits, config.filler_count),
            temperature=config.temperature,
            workdir=self.out / "rollout-model",
        )

    def close(self) -> None:
        """Release out_dir's lock (also done by `run()`, and by the process ending)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checkpoints ---------------------------------------------------------------------
    def _state(self) -> dict:
        """A copy of what a checkpoint holds, as of now."""
        return _cloned(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "config": self.config.to_dict(),
            }
        )

    def save_checkpoint(self) -> Path:
        """Save the state of the last finished step (never one caught mid-step)."""
        path = self.out / CHECKPOINT
        policy.save_atomically(self.finished, path)
        return path

    def _restore(self, saved: dict) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(
                f"--resume: {self.out / CHECKPOINT} does not fit this model and optimizer "
                f"({type(error).__name__}); it is damaged or from another version"
            ) from None
        self.step = saved["step"]
        self.finished = self._state()

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, bar=None) -> dict[str, float]:
        """Held-out accuracy: `eval_accuracy` is pass@1 over `eval_samples` samples per
        problem at the training temperature (fixed seed), `eval_greedy` greedy decoding.

        Sampled pass@1 is the headline: it is what GRPO optimises, and a warm start that is
        right greedily on 90% of problems is right on about half of its samples, so the
        sampled number has room to rise where the greedy one has little.

        `bar`, a tqdm bar if given, counts the completions generated.
        """
        k = self.config.eval_samples
        greedy = self.rollouts.generate(self.held_out_prompts, greedy=True, seed=0)
        if bar is not None:
            bar.update(len(self.held_out_prompts))
        repeated = [p for p in self.held_out_prompts for _ in range(k)]
        sampled = self.rollouts.generate(repeated, seed=HELD_OUT_SEED)
        if bar is not None:
            bar.update(len(repeated))
        answers = [p.answer for p in self.held_out]
        samples_of = [a for a in answers for _ in range(k)]
        return {
            "eval_accuracy": fmean(reward(t, a) for t, a in zip(sampled.texts, samples_of)),
            "eval_greedy": fmean(reward(t, a) for t, a in zip(greedy.texts, answers)),
        }

    # -- training --------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Train to `config.steps` and release out_dir; on Ctrl-C first save the last
        finished step's checkpoint."""
        if self._lock is None:
            raise RuntimeError("this Trainer has run; build another (resume=True) to go on")
        try:
            self._train()
        except KeyboardInterrupt:
            if self.finished is not None:
                path = self.save_checkpoint()
                print(f"\ninterrupted: saved step {self.step} to {path}")
            raise
        finally:
            self.close()
        evals = [r for r in read_jsonl(self.out / METRICS) if "eval_accuracy" in r]
        return RunResult(
            self.out,
            self.step,
            evals[0]["eval_accuracy"],
            evals[-1]["eval_accuracy"],
            evals[0]["eval_greedy"],
            evals[-1]["eval_greedy"],
        )

    def _train(self) -> None:
        from tqdm.auto import tqdm

        config = self.config
        if self.finished is None:  # a fresh run: step 0 is the warm start's evaluation
            with tqdm(
                total=config.eval_size * (1 + config.eval_samples),
                desc=f"{config.method} seed {config.seed}: step 0, evaluating the warm start",
                unit="completion",
                disable=not config.progress,
            ) as bar:
                self._finish_step(0, self.evaluate(bar))
        bar = tqdm(
            range(self.step + 1, config.steps + 1),
            desc=f"{config.method} seed {config.seed}",
            initial=self.step,
            total=config.steps,
            disable=not config.progress,
        )
        with bar:
            for step in bar:
                record, samples = self._train_step(step)
                if step % config.eval_every == 0 or step == config.steps:
                    record.update(self.evaluate())
                self._finish_step(step, record, samples)
                bar.set_postfix(reward=f"{record['reward']:.2f}")

    def _finish_step(self, step: int, record: dict, samples: list[dict] = ()) -> None:
        """Write the step's records and make it the state checkpoints save.

        The only writer of metrics.jsonl and samples.jsonl. The metrics line is the mark of a
        finished step: until it is written, an interrupt saves the previous step, and a
        resume drops any line of this one.
        """
        for sample in samples:
            _append_line(self.out / SAMPLES, sample)
        _append_line(self.out / METRICS, {"step": step, **record})
        self.step = step
        self.finished = self._state()
        if step and (step % self.config.checkpoint_every == 0 or step == self.config.steps):
            self.save_checkpoint()

    def _train_step(self, step: int) -> tuple[dict, list[dict]]:
        """Rollouts and updates of one step: its metrics record and heatmap samples."""
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
        update = self._update(batch, per_token, step)
        self.rollouts.sync_weights()
        done = time.perf_counter()
        # The problems are drawn without fillers: their solutions are the references.
        departures = [
            None if r > 0 else self._departure(batch, row, problems[row // group].solution)
            for row, r in enumerate(rewards.tolist())
        ]
        faithful = self._faithfulness(batch, weights, departures)

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
            **faithful,
        }
        samples = []
        if weights is not None:
            record.update(weight_statistics(weights, batch["score_mask"]))
            if step % config.eval_every == 0 or step == 1:
                samples = self._samples(
                    step, batch, weights, rewards, advantages, departures, problems
                )
        return record, samples

    def _faithfulness(self, batch, weights, departures) -> dict[str, float]:
        """`faithfulness.batch_metrics` of the step's weights (uniform ones for GRPO)."""
        score_mask = batch["score_mask"]
        if weights is None:
            weights = torch.ones(score_mask.shape, device=score_mask.device)
        return faithfulness.batch_metrics(
            weights.cpu(), score_mask.cpu(), self._filler_mask(batch).cpu(), departures
        )

    def _filler_mask(self, batch) -> torch.Tensor:
        """[N, T] bool: completion tokens that are filler characters."""
        ids = batch["input_ids"]
        return torch.isin(ids, self.filler_ids.to(ids.device)) & batch["completion_mask"]

    def _departure(self, batch, row: int, reference: str) -> int | None:
        """The column of the row's first token off the (filler-free) reference solution."""
        cols = batch["completion_mask"][row].nonzero().flatten().tolist()
        tokens = self.tokenizer.convert_ids_to_tokens(batch["input_ids"][row, cols].tolist())
        index = faithfulness.first_departure(tokens, reference, FILLERS)
        return None if index is None else cols[index]

    def _batch(self, rollouts: Rollouts) -> dict:
        score_mask, answer_mask = completion_spans(
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
        result = oar_advantages(
            self.model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["score_mask"],
            batch["answer_mask"],
            advantages,
            method=config.importance,
            mode=config.oar_mode,
            mask_token_id=self.tokenizer.pad_token_id,
            generator=generator,
            tau=config.reshape_tau,
            beta=config.reshape_beta,
            floor=config.reshape_floor,
        )
        if config.control is None:
            return result.advantages, result.weights
        shuffles = torch.Generator().manual_seed(seed)
        weights = permute_weights(result.weights, batch["score_mask"], config.control, shuffles)
        return advantages[:, None] * weights, weights

    def _update(self, batch: dict, per_token: torch.Tensor, step: int) -> dict:
        """The `num_iterations` updates of step `step`: its loss and update metrics."""
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
            result = grpo_loss(
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
            update = (step - 1) * config.num_iterations + iteration
            for group in self.optimizer.param_groups:
                group["lr"] = _warmed_lr(config, update)
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
            lr=self.optimizer.param_groups[0]["lr"],  # of the last update
            grad_norm=grad_norm.item(),
        )
        if self.reference is not None:
            metrics["kl_to_ref"] = result.mean_kl.item()
        return metrics

    def _samples(
        self, step, batch, weights, rewards, advantages, departures, problems
    ) -> list[dict]:
        """A few completions with their prompt, expected answer, token weights, filler
        tokens and first departure (an index into the tokens, or None), for `viz`'s
        heatmap."""
        samples = []
        fillers = self._filler_mask(batch)
        group = self.config.num_generations
        for row in range(min(self.config.heatmap_samples, weights.shape[0])):
            problem = problems[row // group]
            cols = batch["completion_mask"][row].nonzero().flatten().tolist()
            ids = batch["input_ids"][row, cols].tolist()
            samples.append(
                {
                    "step": step,
                    "method": self.config.method,
                    "prompt": problem.prompt,
                    "answer": problem.answer,
                    "reward": rewards[row].item(),
                    "advantage": advantages[row].item(),
                    "tokens": [self.tokenizer.decode([i]) for i in ids],
                    "weights": [round(w, 4) for w in weights[row, cols].tolist()],
                    "scored": batch["score_mask"][row, cols].tolist(),
                    "filler": fillers[row, cols].tolist(),
                    "departure": None if departures[row] is None else cols.index(departures[row]),
                }
            )
        return samples


def warm_start(config: TrainConfig, tokenizer=None):
    """The supervised warm start `config`'s runs begin from (on the CPU, trained once and
    then read from the cache): the policy of step 0."""
    spec = policy.ModelSpec(hidden_size=config.hidden_size, num_layers=config.num_layers)
    warm = policy.WarmStart(
        target_accuracy=config.warm_start_accuracy,
        max_steps=config.warm_start_max_steps,
        digits=config.digits,
        fillers=config.filler_count,
    )
    tokenizer = tokenizer or build_tokenizer()
    return policy.warm_started_model(tokenizer, spec, warm, progress=config.progress)


def _warmed_lr(config: TrainConfig, update: int) -> float:
    """The learning rate of the run's `update`-th optimizer update (from 0): rising linearly
    to `lr` over the first `warmup_updates`.

    AdamW's first update moves every weight by about lr whatever its gradient (its
    bias-corrected m / sqrt(v) is sign(g)): at lr 1e-4 step 1's policy moved so far that the
    next update's kl_to_old was 1.9-6.0, against <= 0.003 at every later step. A function of
    the update's index, not a scheduler's state, so a resumed run needs nothing saved."""
    if update >= config.warmup_updates:
        return config.lr
    return config.lr * (update + 1) / config.warmup_updates


def _cloned(state):
    """A copy of a state dict whose tensors are cloned (50 times faster than deepcopy, which
    matters once a step); other leaves are immutable numbers and strings, shared."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _cloned(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_cloned(value) for value in state)
    return state


def _check_rollout_backend(config: TrainConfig) -> None:
    """A vLLM run where vLLM cannot run is refused before the warm start."""
    missing = config.rollout_backend == "vllm" and vllm_unavailable()
    if missing:
        raise ConfigError(missing)


# -- out_dir -------------------------------------------------------------------------------
@contextmanager
def _out_dir_errors(out: Path):
    """OSErrors from preparing out_dir (read-only, a file, a full disk) as ConfigErrors."""
    try:
        yield
    except OSError as error:
        raise ConfigError(
            f"out_dir {out} is not a writable directory: {error.strerror or error}"
        ) from error


def _lock_out_dir(out: Path):
    """Create out_dir and take its exclusive lock: the open lock file, which holds the lock
    until closed (flock locks die with their file, so a crashed run leaves none behind)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out} is a file, not a directory")
    with _out_dir_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "a process that has not yet written its name"
        lock.close()
        raise ConfigError(
            f"out_dir {out} is in use by another training ({holder}); wait for it to end or "
            "choose another --out-dir"
        ) from None
    with _out_dir_errors(out):
        lock.truncate(0)  # append mode: the next write lands at the start
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
    return lock


def _read_checkpoint(path: Path, device: torch.device, config: TrainConfig) -> dict:
    """The checkpoint's state, checked to continue `config`'s run; a ConfigError otherwise.

    Loaded with weights_only=True, and torch's message is not passed on: for a file that
    only loads unsafely it advises weights_only=False, which would run the file's code.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch fails in many ways (zip, pickle, EOF): all unreadable
        what = "it is empty" if path.stat().st_size == 0 else type(error).__name__
        raise ConfigError(
            f"--resume: {path} is not a readable checkpoint ({what}); it is damaged or was "
            "not written by this trainer: --overwrite starts the run afresh"
        ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["step"], int) or not isinstance(state["config"], dict):
        raise ConfigError(
            f"--resume: {path} is not a checkpoint of this trainer (it lacks or garbles "
            f"{', '.join(missing) or 'step or config'}): --overwrite starts the run afresh"
        )
    asked, saved = config.to_dict(), {**FIELDS_ADDED, **state["config"]}
    changed = sorted(k for k in asked if k not in RESUMABLE_CHANGES and saved.get(k) != asked[k])
    if changed:
        raise ConfigError(f"--resume: the checkpoint was trained with other {changed}")
    return state


# -- jsonl records -------------------------------------------------------------------------
def _append_line(path: Path, record: dict) -> None:
    """One record as one write: only a crash (or a full disk) can leave a torn line."""
    data = (json.dumps(record) + "\n").encode()
    with open(path, "ab", buffering=0) as file:
        written = file.write(data)
    if written != len(data):
        raise OSError(f"wrote {written} of {len(data)} bytes of a record to {path}")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a .jsonl file; a line that is not a JSON object (torn by a crash) is
    skipped with a warning."""
    if not Path(path).exists():
        return []
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(
                f"{path}, line {number}: skipped a line that is not a JSON record "
                "(torn by a crash?)",
                stacklevel=2,
            )
            continue
        records.append(record)
    return records


def _rewind_jsonl(path: Path, last_step: int) -> list[dict]:
    """Keep the records up to `last_step` (a checkpoint's), dropping later and torn ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn line is the expected trace of a crash here
        records = read_jsonl(path)
    kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= last_step]
    _write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _rewind_metrics(path: Path, last_step: int) -> None:
    """`_rewind_jsonl`, and a resumed run's metrics must hold each step up to the
    checkpoint's once, or the finished file would not be that of one run."""
    steps = [r["step"] for r in _rewind_jsonl(path, last_step)]
    if steps != list(range(last_step + 1)):
        raise ConfigError(
            f"--resume: {path} does not hold the records of steps 0 to {last_step} (the "
            "checkpoint's) once each, in order; --overwrite starts the run afresh"
        )


def _write_text_atomically(path: Path, text: str) -> None:
    policy.replace_atomically(path, lambda file: file.write(text.encode()))


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train one run; writes config.yaml, metrics.jsonl, samples.jsonl and checkpoint.pt
    under config.out_dir (see `oar_kernels.grpo.viz` for the pictures). An out_dir that
    already holds a run is continued with resume=True, replaced with overwrite=True, and
    otherwise refused. Refusals are ConfigErrors, raised before the warm start: also an
    out_dir that another run holds or that cannot be written, and an unreadable checkpoint."""
    return Trainer(config, resume=resume, overwrite=overwrite).run()
