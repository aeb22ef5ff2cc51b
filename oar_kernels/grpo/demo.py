"""`oar-kernels demo`: GRPO vs OAR on the embedded task, several seeds at equal steps.

Every run starts from the same cached warm start and sees the same held-out problems; a
seed fixes its prompts and samples. The table answers the research question as measured:
the held-out accuracy (greedy) after `steps` steps, mean and spread over seeds, and each
OAR method's paired difference to GRPO.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from oar_kernels.grpo import viz
from oar_kernels.grpo.config import TrainConfig
from oar_kernels.grpo.loop import RunResult, train


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def results_table(results: dict[str, list[RunResult]]) -> str:
    """Markdown: per method the held-out sampled pass@1 at the start and after the last step
    (mean ± std over seeds), each OAR method's paired (same seed) difference to GRPO, and
    the final greedy accuracy."""
    lines = [
        "| method | seeds | start pass@1 | final pass@1 (mean ± std) | per seed | vs grpo "
        "(paired) | final greedy |",
        "|---|---|---|---|---|---|---|",
    ]
    baseline = results.get("grpo")
    for method, runs in results.items():
        finals = [r.final_accuracy for r in runs]
        paired = "—"
        if baseline is not None and method != "grpo":
            diffs = [r.final_accuracy - b.final_accuracy for r, b in zip(runs, baseline)]
            paired = f"{_spread(diffs)} ({sum(d > 0 for d in diffs)}/{len(diffs)} seeds better)"
        lines.append(
            f"| {method} | {len(runs)} | {runs[0].start_accuracy:.3f} | {_spread(finals)} | "
            f"{', '.join(f'{v:.3f}' for v in finals)} | {paired} | "
            f"{_spread([r.final_greedy for r in runs])} |"
        )
    return "\n".join(lines)


def run(
    out_dir: str | Path = "runs/demo",
    *,
    methods: tuple[str, ...] = ("grpo", "oar-g"),
    seeds: int = 3,
    steps: int = 30,
    progress: bool = True,
    **overrides,
) -> dict[str, list[RunResult]]:
    """Train every method on every seed, then write results.md/.json and the pictures."""
    out_dir = Path(out_dir)
    began = time.perf_counter()
    results: dict[str, list[RunResult]] = {m: [] for m in methods}
    for seed in range(seeds):
        for method in methods:
            config = TrainConfig.from_dict(
                {
                    "method": method,
                    "seed": seed,
                    "steps": steps,
                    "out_dir": str(out_dir / f"{method}-seed{seed}"),
                    "progress": progress,
                    **overrides,
                }
            )
            results[method].append(train(config, overwrite=True))  # a demo reruns
    table = results_table(results)
    minutes = (time.perf_counter() - began) / 60
    header = (
        f"Held-out accuracy ({TrainConfig.eval_size} problems; pass@1 over "
        f"{TrainConfig.eval_samples} samples each at the training temperature, and greedy) "
        f"after {steps} steps, {seeds} seeds, {minutes:.1f} min in all."
    )
    (out_dir / "results.md").write_text(f"{header}\n\n{table}\n")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                m: [
                    {"seed": s, **{k: v for k, v in vars(r).items() if k != "out_dir"}}
                    for s, r in enumerate(rs)
                ]
                for m, rs in results.items()
            },
            indent=1,
        )
    )
    written = viz.render([r.out_dir for rs in results.values() for r in rs], out_dir)
    print(f"\n{header}\n\n{table}\n")
    print("wrote " + ", ".join(str(p) for p in [out_dir / "results.md", *written]))
    return results
