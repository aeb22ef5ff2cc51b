"""`oar-kernels study`: does OAR assign credit better than GRPO? The design of
docs/study/DESIGN.md, run as arms x filler counts x seeds.

Runs go seed by seed (every arm and F of seed 0, then seed 1, ...), so a study stopped early
holds complete paired sets; a run whose metrics reach the last step is not run again, so a
stopped study continues where it stopped. The table is rewritten after every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from oar_kernels.grpo import stats, viz
from oar_kernels.grpo.config import RUN_CONFIG, ConfigError, TrainConfig
from oar_kernels.grpo.loop import METRICS, read_jsonl, train, warm_start

# Each arm: a method and the settings that make it (the rest is TrainConfig's defaults).
# "-authors" are the released code's defaults: OAR-P with the KL at the first answer
# position (mode "last"), OAR-G with answer_mean and noise 1e-3 (the package's default
# noise in the KL modes).
ARMS = {
    "grpo": {"method": "grpo"},
    "oar-g": {"method": "oar-g"},
    "oar-g-shuffled": {"method": "oar-g-shuffled"},
    "oar-g-inverted": {"method": "oar-g-inverted"},
    "oar-g-authors": {"method": "oar-g", "oar_mode": "answer_mean"},
    "oar-p": {"method": "oar-p"},
    "oar-p-shuffled": {"method": "oar-p-shuffled"},
    "oar-p-authors": {"method": "oar-p", "oar_mode": "last"},
}
BASELINE = "grpo"
PRESETS = {
    # the pilot that sizes the study (DESIGN.md, "Seed count")
    "pilot": {"arms": ("grpo", "oar-g"), "fillers": (24,), "seeds": 3},
    # the full design; 9 seeds: DESIGN.md's rule on the pilot's d_z = -1.11 (results.md)
    "study": {"arms": tuple(ARMS), "fillers": (24, 0), "seeds": 9},
}
FAITHFULNESS = ("filler_weight_share", "departure_percentile", "ess_ratio")


def run_config(arm: str, fillers: int, seed: int, steps: int, out: Path, **overrides):
    return TrainConfig.from_dict(
        {
            **ARMS[arm],
            "task": "filler",
            "fillers": fillers,
            "seed": seed,
            "steps": steps,
            "out_dir": str(out / f"F{fillers}" / f"{arm}-seed{seed}"),
            **overrides,
        }
    )


# Fields that change how a run is shown or saved, not what it computes: a finished run is
# reused whatever they were.
PRESENTATION = ("progress", "heatmap_samples", "checkpoint_every", "out_dir")


# Seconds a stopped study waits for its worker processes' runs to save and stop.
STOP_GRACE_S = 30


class StudyError(ConfigError):
    """The study's directory holds a finished run that is not the one the study asks for."""


def finished(config: TrainConfig) -> bool:
    """Whether the run `config` asks for has finished in its out_dir. A finished run of any
    other configuration there (an older default, another lr) is a StudyError, not reused:
    its figures would enter the table as those of the asked-for run."""
    out_dir = Path(config.out_dir)
    records = read_jsonl(out_dir / METRICS) if (out_dir / METRICS).exists() else []
    if not any(r.get("step") == config.steps and "eval_accuracy" in r for r in records):
        return False
    if not (out_dir / RUN_CONFIG).exists():
        raise StudyError(
            f"{out_dir} holds a finished run's metrics but no {RUN_CONFIG}: its configuration "
            "is unknown; give the study a fresh --out, or move that run away to rerun it"
        )
    try:
        ran = TrainConfig.of_run(out_dir).to_dict()
    except ConfigError as error:  # a config this version no longer accepts
        raise StudyError(f"{out_dir}: {error}") from error
    asked = config.to_dict()
    differs = [k for k in asked if k not in PRESENTATION and ran[k] != asked[k]]
    if differs:
        changes = ", ".join(f"{k}={ran[k]!r} (asked {asked[k]!r})" for k in differs)
        raise StudyError(
            f"{out_dir} holds a finished run of another configuration: {changes}; "
            "give the study a fresh --out, or move that run away to rerun it"
        )
    return True


def summarise_run(out_dir: Path) -> dict:
    """AUC, final pass@1 and the faithfulness metrics (mean over training steps) of a run."""
    records = read_jsonl(out_dir / METRICS)
    points = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    trained = [r for r in records if "reward" in r]
    summary = {"auc": stats.auc(points), "final": points[-1][1], "start": points[0][1]}
    for key in FAITHFULNESS:
        values = [r[key] for r in trained if key in r]
        summary[key] = statistics.fmean(values) if values else None
    return summary


def _ci(values: list[float]) -> str:
    ci = stats.mean_ci(values)
    return f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]"


def _mean(values: list) -> str:
    kept = [v for v in values if v is not None]
    return f"{statistics.fmean(kept):.3f}" if kept else "—"


def results_table(summaries: dict[int, dict[str, dict[int, dict]]]) -> str:
    """Markdown: per F and arm, AUC and final pass@1 (mean [95% t CI] over seeds), the
    paired AUC difference to GRPO over the seeds both have (mean [CI], exact sign-flip p,
    seeds better, d_z), and the faithfulness means. summaries[F][arm][seed] = summarise_run."""
    lines = [
        "| F | arm | seeds | AUC pass@1 [95% CI] | final pass@1 [95% CI] | AUC − grpo "
        "[95% CI] | sign-flip p | better | d_z | filler weight share | departure pct | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for fillers, arms in summaries.items():
        baseline = arms.get(BASELINE, {})
        for arm, runs in arms.items():
            seeds = sorted(runs)
            if not seeds:  # not run yet
                continue
            cells = ["—", "—", "—", "—"]
            common = [s for s in seeds if s in baseline]
            if arm != BASELINE and len(common) >= 2:
                result = stats.paired(
                    [runs[s]["auc"] for s in common], [baseline[s]["auc"] for s in common]
                )
                cells = [
                    str(result.difference),
                    f"{result.p:.3f}",
                    f"{result.better}/{len(common)}",
                    f"{result.d_z:+.2f}",
                ]
            lines.append(
                f"| {fillers} | {arm} | {len(seeds)} | {_ci([runs[s]['auc'] for s in seeds])} | "
                f"{_ci([runs[s]['final'] for s in seeds])} | {' | '.join(cells)} | "
                + " | ".join(_mean([runs[s][k] for s in seeds]) for k in FAITHFULNESS)
                + " |"
            )
    return "\n".join(lines)


def run(
    out_dir: str | Path,
    *,
    arms: tuple[str, ...],
    fillers: tuple[int, ...],
    seeds: int,
    first_seed: int = 0,
    steps: int = 30,
    progress: bool = True,
    train_missing: bool = True,
    rerun: bool = False,
    workers: int = 1,
    **overrides,
) -> dict:
    """Run (or continue) the study; writes results.md/.json and the pictures under out_dir.

    train_missing=False only tabulates the runs already finished (those of processes that
    ran disjoint parts of the study into one out_dir, say) and trains nothing; rerun=True
    trains every run afresh, finished or not (the demo's way). workers > 1
    trains that many runs at once, each in its own process with `worker_threads(workers)`
    torch threads. A run's figures depend on its thread count (CPU float sums do), not on
    which runs train beside it.
    """
    out = Path(out_dir)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; arms are {', '.join(ARMS)}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    began = time.perf_counter()
    plan = {
        (count, arm, seed): run_config(arm, count, seed, steps, out, progress=progress, **overrides)
        for seed in range(first_seed, first_seed + seeds)
        for count in fillers
        for arm in arms
    }
    if rerun and not train_missing:
        raise ValueError("rerun=True trains every run: it cannot go with train_missing=False")
    todo = [c for c in plan.values() if rerun or not finished(c)] if train_missing else []
    pending = {c.out_dir for c in todo}  # to be (re)trained: not read until they are

    def tabulate() -> dict[int, dict[str, dict[int, dict]]]:
        summaries: dict = {f: {a: {} for a in arms} for f in fillers}
        for (count, arm, seed), config in plan.items():
            if config.out_dir not in pending and finished(config):
                summaries[count][arm][seed] = summarise_run(Path(config.out_dir))
        return summaries

    with contextlib.closing(_train_runs(todo, workers)) as trained:
        for config in trained:
            pending.discard(config.out_dir)
            _write_results(out, tabulate(), began, rerun)
    summaries = tabulate()
    _write_results(out, summaries, began, rerun)
    _write_pictures(out, summaries)
    return summaries


def _train_runs(configs: list[TrainConfig], workers: int):
    """Train `configs` (replacing any unfinished run in their out_dirs), yielding each as
    it finishes; with workers > 1, in that many processes at once (even for one run, so a
    run's thread count does not depend on how many are left)."""
    if workers == 1:
        for config in configs:
            train(config, overwrite=True)
            yield config
        return
    if not configs:
        return
    from tqdm.auto import tqdm

    # Every warm start a run needs, trained here once, not by several workers at a time.
    for count in sorted({c.filler_count for c in configs}):
        warm_start(next(c for c in configs if c.filler_count == count))
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=torch.set_num_threads,
        initargs=(worker_threads(workers),),
    )
    # Per-run bars of several processes would interleave: one bar over the runs.
    queue = [dataclasses.replace(c, progress=False) for c in configs]
    bar = tqdm(
        total=len(queue), desc=f"runs ({workers} at a time)", disable=not configs[0].progress
    )
    running: dict = {}
    try:
        with bar:
            while queue or running:
                # No more jobs than workers: none waits queued inside a worker, so a stopped
                # study stops the runs it started and starts no other.
                while queue and len(running) < workers:
                    config = queue.pop(0)
                    running[pool.submit(train, config, overwrite=True)] = config
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for job in done:
                    config = running.pop(job)
                    job.result()  # a failed run stops the study with its error
                    bar.set_postfix_str(f"done F{config.filler_count} {Path(config.out_dir).name}")
                    bar.update()
                    yield config
    except BaseException:
        # Runs that got the same Ctrl-C save their last finished step and stop; one still
        # going after the grace period (another run failed) is stopped where it is.
        if wait(running, timeout=STOP_GRACE_S).not_done:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def worker_threads(workers: int) -> int:
    """Torch threads of each of `workers` processes: an equal share of the cores this
    process may use, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // workers)


# The confirmatory family of docs/study/DESIGN.md: four comparisons at one F, Holm at 0.05.
CONFIRMATORY_F = 24
CONFIRMATORY = (
    ("oar-g", "grpo"),
    ("oar-p", "grpo"),
    ("oar-g", "oar-g-shuffled"),
    ("oar-p", "oar-p-shuffled"),
)


def confirmatory(summaries: dict[int, dict[str, dict[int, dict]]]) -> str:
    """Markdown lines: each comparison of the confirmatory family at CONFIRMATORY_F (paired
    AUC difference over the seeds both arms have, exact sign-flip p, Holm-adjusted over
    the whole declared family: a comparison not run counts as p = 1), or "not run"."""
    arms = summaries.get(CONFIRMATORY_F, {})
    tested = {}
    for arm, other in CONFIRMATORY:
        runs, base = arms.get(arm, {}), arms.get(other, {})
        common = sorted(s for s in runs if s in base)
        if len(common) >= 2:
            result = stats.paired(
                [runs[s]["auc"] for s in common], [base[s]["auc"] for s in common]
            )
            tested[(arm, other)] = (result, len(common))
    adjusted = dict(
        zip(tested, stats.holm([r.p for r, _ in tested.values()], family=len(CONFIRMATORY)))
    )
    lines = [f"Confirmatory family (F = {CONFIRMATORY_F}, AUC, Holm over {len(CONFIRMATORY)}):"]
    for arm, other in CONFIRMATORY:
        if (arm, other) not in tested:
            lines.append(f"- {arm} − {other}: not run")
            continue
        result, n = tested[(arm, other)]
        holm = adjusted[(arm, other)]
        lines.append(
            f"- {arm} − {other}: {result.difference}, sign-flip p = {result.p:.3f}, Holm p = "
            f"{holm:.3f} ({'rejects' if holm < 0.05 else 'does not reject'} H0 at 0.05), "
            f"{result.better}/{n} seeds better, d_z = {result.d_z:+.2f}"
        )
    return "\n".join(lines)


def _write_results(out: Path, summaries: dict, began: float, rerun: bool = False) -> None:
    table = f"{results_table(summaries)}\n\n{confirmatory(summaries)}"
    minutes = (time.perf_counter() - began) / 60
    header = (
        f"Held-out pass@1 ({TrainConfig.eval_size} problems x {TrainConfig.eval_samples} "
        f"samples), AUC = mean over the eval points after step 0; {minutes:.1f} min of runs "
        + (
            "in this invocation (every run trained afresh)."
            if rerun
            else "in this invocation (finished runs found on disk are not rerun)."
        )
    )
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(summaries, indent=1))
    print(f"\n{table}\n", flush=True)


def _write_pictures(out: Path, summaries: dict) -> None:
    for count, arms in summaries.items():
        dirs = [out / f"F{count}" / f"{a}-seed{s}" for a, runs in arms.items() for s in runs]
        if dirs:
            viz.render(dirs, out / f"F{count}")
