"""`oar-kernels demo`: the README's main job, a small cut of the filler study.

GRPO, OAR-G and its shuffled control on the filler task (F = 24 filler letters before each
step, which cannot change the answer: the case where credit assignment should matter),
3 seeds of 30 steps, two runs at a time on a 2-core machine: about a quarter hour. It is
`study.run` on those arms (docs/study/DESIGN.md): the same runs, the same table (AUC and
final held-out pass@1 with 95% t intervals, paired differences to GRPO with the exact
sign-flip p, filler weight share, first-departure percentile, ESS), the same pictures. Three
seeds detect only large effects; the study preset runs the full design.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from oar_kernels.grpo import study

ARMS = ("grpo", "oar-g", "oar-g-shuffled")
FILLERS = 24
SEEDS = 3
STEPS = 30


def default_workers(runs: int) -> int:
    """One run per core on a CPU machine (at most `runs`); one at a time with CUDA."""
    import torch

    if torch.cuda.is_available():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(runs, cores or 1))


def run(
    out_dir: str | Path = "runs/demo",
    *,
    arms: tuple[str, ...] = ARMS,
    fillers: int = FILLERS,
    seeds: int = SEEDS,
    steps: int = STEPS,
    workers: int | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Train every arm on every seed afresh (runs left in out_dir are replaced), then
    write results.md/.json and the pictures; returns the study's summaries."""
    out_dir = Path(out_dir)
    workers = default_workers(len(arms) * seeds) if workers is None else workers
    began = time.perf_counter()
    summaries = study.run(
        out_dir,
        arms=arms,
        fillers=(fillers,),
        seeds=seeds,
        steps=steps,
        progress=progress,
        workers=workers,
        rerun=True,
        **overrides,
    )
    minutes = (time.perf_counter() - began) / 60
    print(
        f"{len(arms)} arms x {seeds} seeds at F = {fillers}, {steps} steps: {minutes:.1f} min "
        f"({workers} at a time); wrote {out_dir / 'results.md'} and the pictures in "
        f"{out_dir / f'F{fillers}'}"
    )
    return summaries
