"""The embedded policy: a small Llama-config transformers model over the task's character
tokenizer, warm-started by a short supervised phase on worked solutions so that GRPO starts
from a model that is sometimes right. The warm start is cached on disk, keyed by everything
that shapes it, so a second run (and every seed and method of the demo) skips it; an entry
that cannot be loaded is trained again.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oar_kernels.grpo.task import Problem, filler_tokens, make_problem


@dataclass(frozen=True)
class ModelSpec:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 256  # positions; a 3-digit problem + solution is about 110 characters


@dataclass(frozen=True)
class WarmStart:
    """Supervised steps until greedy accuracy on a validation set reaches `target_accuracy`
    (checked every `check_every` steps from `min_steps`), at most `max_steps`.

    A target rather than a step count: the accuracy of this tiny model jumps from 0.1 to 0.9
    within about 75 steps, and where the jump happens moves with the platform's arithmetic,
    so a fixed count would start GRPO from very different models on different machines.
    """

    target_accuracy: float = 0.8
    max_steps: int = 600
    min_steps: int = 150
    check_every: int = 10
    validation_size: int = 64
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    seed: int = 0
    digits: int = 3
    fillers: int = 0  # the filler task's F (task.make_problem); 0 is the plain task


def build_model(tokenizer, spec: ModelSpec, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized by `spec` (tied input/output embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """<bos> + the question; every prompt the policy sees (warm start, rollouts) starts so."""
    return [tokenizer.bos_token_id] + tokenizer(problem.prompt, add_special_tokens=False)[
        "input_ids"
    ]


def supervised_batch(tokenizer, problems: list[Problem]):
    """input_ids, attention_mask, labels [N, T]: prompt + solution + <eos>, right padded;
    labels are -100 on the prompt and padding so only the solution is learned."""
    rows = []
    for problem in problems:
        prompt = prompt_ids(tokenizer, problem)
        solution = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        rows.append((prompt, solution + [tokenizer.eos_token_id]))
    width = max(len(p) + len(s) for p, s in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (prompt, solution) in enumerate(rows):
        end = len(prompt) + len(solution)
        input_ids[i, :end] = torch.tensor(prompt + solution)
        labels[i, len(prompt) : end] = torch.tensor(solution)
        attention_mask[i, :end] = 1
    return input_ids, attention_mask, labels


def cache_dir() -> Path:
    root = os.environ.get("OAR_KERNELS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(root) / "oar-kernels" if root else Path.home() / ".cache" / "oar-kernels"


def _cache_key(tokenizer, spec: ModelSpec, warm: WarmStart) -> str:
    warm_shape = asdict(warm)
    if not warm.fillers:  # the plain task keeps the key it had before fillers existed
        del warm_shape["fillers"]
    shape = {
        "spec": asdict(spec),
        "warm": warm_shape,
        "vocab": tokenizer.get_vocab(),
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def warm_started_model(
    tokenizer, spec: ModelSpec, warm: WarmStart, *, cache: Path | None = None, progress=True
):
    """The supervised warm start of `build_model(tokenizer, spec)` in eval mode on the CPU,
    from the cache if there. A cache entry that cannot be loaded (a torn or foreign file) is
    discarded with a warning and trained again."""
    path = (cache or cache_dir()) / f"warm-start-{_cache_key(tokenizer, spec, warm)}.pt"
    model = _load_cached(path, tokenizer, spec, warm)
    if model is None:
        model = build_model(tokenizer, spec, seed=warm.seed)
        _supervised_training(model, tokenizer, warm, progress)
        save_atomically(model.state_dict(), path)
    return model.eval()


def _load_cached(path: Path, tokenizer, spec: ModelSpec, warm: WarmStart):
    """The cached warm start, or None when there is none or it cannot be loaded."""
    if not path.exists():
        return None
    model = build_model(tokenizer, spec, seed=warm.seed)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # The cache is ours to rebuild, and torch.load fails in many ways (zip, pickle, EOF,
    # shapes) that all mean the same here: this file is no warm start.
    except Exception as error:
        warnings.warn(
            f"the warm-start cache {path} cannot be loaded ({type(error).__name__}); "
            "deleting it and training the warm start again",
            stacklevel=3,
        )
        path.unlink(missing_ok=True)
        return None
    return model


def save_atomically(state: dict, path: Path) -> None:
    """torch.save through a temporary file (see `replace_atomically`)."""
    replace_atomically(path, lambda file: torch.save(state, file))


def replace_atomically(path: Path, write) -> None:
    """Replace `path` by what `write(binary_file)` writes, through a temporary file of its
    own in the same directory: a run killed mid-write leaves the old file whole, and two
    processes writing one path at once each leave a whole file, never a mix of both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own, so concurrent writers never share one (not mkstemp: its files are
    # 0600 whatever the umask).
    partial = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(partial, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name points at it
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _supervised_training(model, tokenizer, warm: WarmStart, progress: bool) -> None:
    from tqdm.auto import tqdm

    from oar_kernels.grpo.rollout import HFRollouts
    from oar_kernels.grpo.task import make_dataset, reward

    rng, filler_rng = random.Random(warm.seed), random.Random(f"fillers-{warm.seed}")
    validation = make_dataset(warm.validation_size, warm.seed + 7919, warm.digits)
    prompts = [prompt_ids(tokenizer, p) for p in validation]
    greedy = HFRollouts(model, tokenizer, max_new_tokens=_solution_budget(warm), temperature=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=warm.lr, weight_decay=0.0)
    accuracy, checked = 0.0, False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(warm.seed)
        # Counts to the cap; when the target stops it earlier, the bar ends at that step.
        bar = tqdm(total=warm.max_steps, desc="warm start", disable=not progress)
        for step in range(1, warm.max_steps + 1):
            model.train()
            problems = [
                make_problem(rng, warm.digits, warm.fillers, filler_rng)
                for _ in range(warm.batch_size)
            ]
            input_ids, attention_mask, labels = supervised_batch(tokenizer, problems)
            for group in optimizer.param_groups:
                group["lr"] = warm.lr * min(1.0, step / warm.warmup_steps)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), warm.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            if step >= min(warm.min_steps, warm.max_steps) and step % warm.check_every == 0:
                texts = greedy.generate(prompts, greedy=True, seed=0).texts
                accuracy = sum(reward(t, p.answer) for t, p in zip(texts, validation))
                accuracy /= len(validation)
                checked = True
            # The accuracy shown is the one the stop rule last saw (greedy, validation set).
            shown = (
                f"{accuracy:.2f}" if checked else f"from step {min(warm.min_steps, warm.max_steps)}"
            )
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=shown)
            if checked and accuracy >= warm.target_accuracy:
                bar.total = step  # the bar ends where the warm start did
                bar.set_description(f"warm start: reached {warm.target_accuracy} target")
                break
        else:
            if warm.max_steps:
                bar.set_description(f"warm start: step cap, below {warm.target_accuracy} target")
        bar.close()
    model.eval()


def _solution_budget(warm: WarmStart) -> int:
    """Tokens a worked solution of `digits`-digit operands needs, with room to spare."""
    return 32 * (warm.digits + 1) + filler_tokens(warm.digits, warm.fillers)
