"""OAR-P's cheaper variants on the embedded task: agreement with exact OAR-P and cost.

Real rollouts of the warm-started tiny policy (oar_kernels.grpo: 3-digit additions, a
character tokenizer, 2-layer Llama), masks from `completion_spans`, the mask token the
trainer uses (<pad>), mode answer_joint (the trainer's default) or last (`--mode`). Per variant:
* agreement per row with exact OAR-P over the row's scored tokens: Spearman's rho (average
  ranks for ties; rows where either side is constant are left out) and top-10% overlap
  (|top_n(exact) ∩ top_n(variant)| / n, n = max(1, int(0.1 * scored)), ties broken by column);
  median and interquartile range over all rows of all batches;
* cost relative to exact OAR-P per batch: token forwards (the passes' own counts: OAR-P's
  clean forward plus recomputed suffixes; the hybrid's OAR-G pass charged 4 per real token)
  and time (each batch's variants timed in turn, repeat after repeat, on one torch thread;
  process CPU time, so other processes on a shared box cost little; median over repeats);
  median and IQR over batches.

    python3 -m bench.test_bench_variants --seeds 0 1 2 3 4 5 6 7   # the README's table
    pytest bench/test_bench_variants.py --benchmark-disable                     # CI: seconds
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

import oar_kernels as ok
from oar_kernels.importance.variants import hybrid_importance, step_segments, window_segments

MODES = ("answer_joint", "last")  # the trainer's default first


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "exact", "stride", "windows", "steps", "hybrid"
    size: int = 1  # stride, window width or k
    noise_std: float | None = None  # the hybrid's OAR-G noise (None: its default)


VARIANTS = [
    Variant("exact OAR-P", "exact"),
    Variant("stride 2", "stride", 2),
    Variant("stride 4", "stride", 4),
    Variant("stride 8", "stride", 8),
    Variant("windows of 4", "windows", 4),
    Variant("windows of 8", "windows", 8),
    Variant("steps (split after '.')", "steps"),
    Variant("hybrid k=8", "hybrid", 8),
    Variant("hybrid k=16", "hybrid", 16),
    Variant("hybrid k=32", "hybrid", 32),
    Variant("hybrid k=32, OAR-G noise 0", "hybrid", 32, noise_std=0.0),  # answer_joint only
]


def policy(small: bool, fillers: int = 0):
    """The tokenizer and the warm-started policy (the trainer's for the task; a short warm
    start if small)."""
    from oar_kernels.grpo.model import ModelSpec, WarmStart, warm_started_model
    from oar_kernels.grpo.task import build_tokenizer

    tokenizer = build_tokenizer()
    if small:
        warm = WarmStart(max_steps=60, min_steps=60, validation_size=8)
    else:
        warm = WarmStart(fillers=fillers)
    return tokenizer, warm_started_model(tokenizer, ModelSpec(), warm, progress=False)


def rollout_batch(model, tokenizer, seed: int, prompts: int, generations: int, fillers: int = 0):
    """[N, T] ids and masks of `prompts` problems x `generations` samples (temperature 1)
    of the task with `fillers` filler characters before each step (0: plain addition)."""
    from oar_kernels.grpo.model import prompt_ids
    from oar_kernels.grpo.rollout import HFRollouts
    from oar_kernels.grpo.task import filler_tokens, make_dataset
    from oar_kernels.spans import completion_spans

    problems = make_dataset(prompts, seed, fillers=fillers)
    ids = [prompt_ids(tokenizer, p) for p in problems for _ in range(generations)]
    budget = 128 + filler_tokens(3, fillers)  # the trainer's completion budget
    rollouts = HFRollouts(model, tokenizer, max_new_tokens=budget, temperature=1.0)
    out = rollouts.generate(ids, seed=seed)
    score, answer = completion_spans(tokenizer, out.input_ids, out.completion_mask)
    return out.input_ids, out.attention_mask, score, answer


def variants(mode: str) -> list[Variant]:
    return [v for v in VARIANTS if v.noise_std != 0 or mode == "answer_joint"]


def run_variant(variant: Variant, model, batch, tokenizer, seed: int, mode: str):
    """Scores [N, T] and token forwards of one variant on one batch."""
    ids, attention, score, answer = batch
    common = dict(mode=mode, mask_token_id=tokenizer.pad_token_id, return_stats=True)
    if variant.kind == "hybrid":
        gen = torch.Generator().manual_seed(seed)
        noise = {} if variant.noise_std is None else {"noise_std": variant.noise_std}
        scores, stats = hybrid_importance(
            model, *batch, k=variant.size, generator=gen, **common, **noise
        )
        return scores, stats.token_forwards
    extra = {}
    if variant.kind == "stride":
        extra["stride"] = variant.size
    elif variant.kind == "windows":
        extra["segments"] = window_segments(score, variant.size)
    elif variant.kind == "steps":
        extra["segments"] = step_segments(ids, score, [tokenizer.convert_tokens_to_ids(".")])
    scores, stats = ok.perturbation_importance(model, *batch, **common, **extra)
    return scores, stats.token_forwards


def ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their ranks), as Spearman's rho needs."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ordered)) + 1]
    ends = np.r_[starts[1:], len(values)]
    out = np.empty(len(values))
    for start, end in zip(starts, ends):
        out[order[start:end]] = (start + end - 1) / 2
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho; NaN when either side is constant."""
    ra, rb = ranks(a) - (len(a) - 1) / 2, ranks(b) - (len(b) - 1) / 2
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def top_overlap(exact: np.ndarray, other: np.ndarray, share: float = 0.1) -> float:
    n = max(1, int(share * len(exact)))

    def top(values):  # highest first, ties by column
        return set(np.argsort(-values, kind="stable")[:n].tolist())

    return len(top(exact) & top(other)) / n


def row_agreement(exact: torch.Tensor, other: torch.Tensor, score: torch.Tensor):
    """Per row with at least 2 scored tokens: (Spearman, top-10% overlap)."""
    rows = []
    for b in range(exact.shape[0]):
        cols = score[b]
        if int(cols.sum()) < 2:
            continue
        e, o = exact[b, cols].double().numpy(), other[b, cols].double().numpy()
        rows.append((spearman(e, o), top_overlap(e, o)))
    return rows


def measure(seeds, prompts, generations, repeats, mode=MODES[0], small=False, fillers=0):
    """{variant name: {"spearman": [...rows], "overlap": [...rows], "forwards": [...batches],
    "time": [...batches]}} (cost lists are ratios to exact OAR-P); and the rows' lengths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer, model = policy(small, fillers)
        chosen = variants(mode)
        results = {
            v.name: {"spearman": [], "overlap": [], "forwards": [], "time": []} for v in chosen
        }
        lengths = []
        for seed in seeds:
            batch = rollout_batch(model, tokenizer, seed, prompts, generations, fillers)
            lengths += batch[2].sum(1).tolist()
            times = {v.name: [] for v in chosen}
            outputs = {}
            warm_up = seed == seeds[0]  # one untimed round, before the first batch's
            for repeat in range(repeats + warm_up):
                for variant in chosen:
                    start = time.process_time()
                    outputs[variant.name] = run_variant(
                        variant, model, batch, tokenizer, seed, mode
                    )
                    if repeat or not warm_up:
                        times[variant.name].append(time.process_time() - start)
            exact, exact_forwards = outputs[VARIANTS[0].name]
            exact_time = np.median(times[VARIANTS[0].name])
            for variant in chosen:
                scores, forwards = outputs[variant.name]
                record = results[variant.name]
                for rho, overlap in row_agreement(exact, scores, batch[2]):
                    record["spearman"].append(rho)
                    record["overlap"].append(overlap)
                record["forwards"].append(forwards / exact_forwards)
                record["time"].append(np.median(times[variant.name]) / exact_time)
        return results, lengths
    finally:
        torch.set_num_threads(threads)


def spread(values) -> str:
    """median [q25, q75] of the finite values."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return "n/a"
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return f"{q50:.2f} [{q25:.2f}, {q75:.2f}]"


def table(results, lengths, seeds, prompts, generations, repeats, mode, fillers=0) -> str:
    task = f"filler task (F={fillers})" if fillers else "addition task"
    lines = [
        f"Embedded {task}, mode {mode}, seeds {list(seeds)}, {prompts} prompts x {generations} "
        f"samples per seed ({len(lengths)} rows, scored tokens per row {spread(lengths)}), "
        f"{repeats} timed repeats, 1 torch thread (CPU time), {platform.machine()}, "
        f"torch {torch.__version__}, {datetime.date.today()}; median [IQR]",
        "",
        "| variant | Spearman vs exact | top-10% overlap | token forwards / exact "
        "| CPU time / exact |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {spread(r['spearman'])} | {spread(r['overlap'])} | "
            f"{spread(r['forwards'])} | {spread(r['time'])} |"
        )
    return "\n".join(lines)


def test_variants_agreement_and_cost():
    """CI: one small batch; exact OAR-P agrees with itself, every variant costs less."""
    results, lengths = measure(seeds=[0], prompts=2, generations=2, repeats=1, small=True)
    exact = results[VARIANTS[0].name]
    assert all(rho == 1 for rho in exact["spearman"] if np.isfinite(rho))
    assert exact["overlap"] and all(o == 1 for o in exact["overlap"])
    for variant in VARIANTS[1:]:
        assert all(0 < f < 1 for f in results[variant.name]["forwards"]), variant.name
        assert all(-1 <= o <= 1 for o in results[variant.name]["overlap"]), variant.name
    print(table(results, lengths, [0], 2, 2, 1, MODES[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=MODES, default=MODES[0])
    parser.add_argument("--fillers", type=int, default=0, help="the filler task's F (0: plain)")
    args = parser.parse_args()
    sizes = (args.seeds, args.prompts, args.generations, args.repeats)
    results, lengths = measure(*sizes, mode=args.mode, fillers=args.fillers)
    print(table(results, lengths, *sizes, args.mode, args.fillers))


if __name__ == "__main__":
    main()
