"""Pictures of runs: reward / held-out accuracy curves per method (PNG) and a heatmap of
OAR's token weights over sampled completions (HTML, and PNG).

    oar-kernels viz runs/demo/*            # writes curves.png, heatmap.html, heatmap.png

PNGs need matplotlib (`pip install 'oar-kernels[demo]'`); the HTML heatmap needs nothing.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from oar_kernels.grpo.config import ConfigError
from oar_kernels.grpo.loop import METRICS, SAMPLES, read_jsonl

COLORS = {"grpo": "#4c72b0", "oar-g": "#dd8452", "oar-p": "#55a868"}
WRAP = 64  # characters per heatmap line


def load_run(run_dir: str | Path) -> dict:
    """config, metrics and samples of one run directory (as `train` wrote them); a line
    torn by a crash is skipped with a warning."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return {
        "dir": run_dir,
        "config": yaml.safe_load(config_path.read_text()),
        "metrics": read_jsonl(run_dir / METRICS),
        "samples": read_jsonl(run_dir / SAMPLES),
    }


def _label(run: dict) -> str:
    """A run's arm: its directory's name without "-seedN" (as demo and study name them),
    else its method."""
    name = re.sub(r"-seed\d+$", "", run["dir"].name)
    return name if name != run["dir"].name else run["config"]["method"]


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_curves(runs: list[dict], path: Path) -> bool:
    """Train reward (5-step running mean) and held-out accuracy per method; one thin line
    per seed, the seeds' mean thick. Returns False when matplotlib is missing."""
    plt = _matplotlib()
    if plt is None:
        return False
    fig, (ax_reward, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(_label(run), []).append(run)
    for method, group in by_method.items():
        color = COLORS.get(method)
        evals = []
        for run in group:
            trained = [r for r in run["metrics"] if "reward" in r]
            steps = [r["step"] for r in trained]
            ax_reward.plot(steps, _smooth([r["reward"] for r in trained]), color=color, lw=0.7)
            points = [
                (r["step"], r["eval_accuracy"]) for r in run["metrics"] if "eval_accuracy" in r
            ]
            evals.append(points)
            ax_eval.plot(*zip(*points), color=color, lw=0.7, alpha=0.5)
        common = min(len(p) for p in evals)
        mean = [sum(p[i][1] for p in evals) / len(evals) for i in range(common)]
        label = f"{method} (mean of {len(group)})"
        ax_eval.plot(
            [evals[0][i][0] for i in range(common)], mean, color=color, lw=2.5, label=label
        )
    ax_reward.set(title="train reward (sampled, running mean)", xlabel="step", ylabel="reward")
    ax_eval.set(title="held-out pass@1 (sampled)", xlabel="step", ylabel="accuracy")
    ax_eval.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _weight_color(weight: float, scored: bool) -> str:
    """White at weight 1; red for boosted (up to 1 + beta), blue for damped tokens."""
    if not scored:
        return "#eeeeee"
    if weight >= 1:
        strength = min(1.0, (weight - 1) / 1.0)
        return f"rgba(214, 39, 40, {0.1 + 0.8 * strength:.2f})"
    return f"rgba(31, 119, 180, {0.1 + 0.8 * min(1.0, 1 - weight):.2f})"


def heatmap_html(samples: list[dict], path: Path, title: str = "OAR token weights") -> None:
    """Each completion's tokens on a background by Bi-Level weight; hover for the value."""
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".c{font-family:monospace;white-space:pre-wrap;line-height:1.9;font-size:15px}"
        ".c span{padding:1px 0}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Red: boosted (pivotal) tokens, blue: damped, grey: not scored (the answer). "
        "The weights multiply the rollout's GRPO advantage; over the scored span they "
        "average 1. Filler characters (the filler task) are in grey italics; a wrong "
        "completion's first token off the reference solution is boxed.</p>",
    ]
    for sample in samples:
        parts.append(
            f"<h3>{html.escape(sample['method'])}, step {sample['step']}: reward "
            f"{sample['reward']:.0f}, GRPO advantage {sample['advantage']:+.2f}</h3><div class=c>"
        )
        fillers = sample.get("filler") or [False] * len(sample["tokens"])
        cells = zip(sample["tokens"], sample["weights"], sample["scored"], fillers)
        for index, (token, weight, scored, filler) in enumerate(cells):
            style = f"background:{_weight_color(weight, scored)}"
            style += ";color:#777;font-style:italic" if filler else ""
            style += ";outline:2px solid black" if index == sample.get("departure") else ""
            parts.append(
                f"<span style='{style}' title='w={weight:.3f}'>{html.escape(token)}</span>"
            )
        parts.append("</div>")
    Path(path).write_text("\n".join(parts))


def heatmap_png(samples: list[dict], path: Path) -> bool:
    """The heatmap as an image: one block of character cells per completion."""
    plt = _matplotlib()
    if plt is None:
        return False
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    cmap = plt.get_cmap("RdBu_r")
    lines = []  # (text, y) per sample header and token row
    for sample in samples:
        lines.append(("header", sample))
        fillers = sample.get("filler") or [False] * len(sample["tokens"])
        marks = [i == sample.get("departure") for i in range(len(fillers))]
        cells = list(zip(sample["tokens"], sample["weights"], sample["scored"], fillers, marks))
        for start in range(0, len(cells), WRAP):
            lines.append(("cells", cells[start : start + WRAP]))
    fig, ax = plt.subplots(figsize=(WRAP * 0.16 + 1, len(lines) * 0.32 + 0.6))
    ax.set_xlim(0, WRAP)
    ax.set_ylim(len(lines), 0)
    ax.axis("off")
    for y, (kind, content) in enumerate(lines):
        if kind == "header":
            ax.text(
                0,
                y + 0.7,
                f"{content['method']} step {content['step']}: reward "
                f"{content['reward']:.0f}, advantage {content['advantage']:+.2f}",
                fontsize=8,
                weight="bold",
            )
            continue
        for x, (token, weight, scored, filler, departure) in enumerate(content):
            color = cmap(norm(min(weight, 2.0))) if scored else (0.93, 0.93, 0.93, 1)
            ax.add_patch(plt.Rectangle((x, y + 0.1), 1, 0.8, color=color, lw=0))
            if departure:  # a wrong completion's first token off the reference
                ax.add_patch(plt.Rectangle((x, y + 0.1), 1, 0.8, fill=False, lw=1.5))
            glyph = token.replace("\n", "⏎").replace("$", r"\$") or " "
            ax.text(
                x + 0.5,
                y + 0.55,
                glyph,
                ha="center",
                va="center",
                family="monospace",
                fontsize=7,
                color="0.45" if filler else "black",  # filler characters in grey
                style="italic" if filler else "normal",
            )
    fig.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.02, label="Bi-Level weight"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def render(run_dirs: list[str | Path], out_dir: str | Path, *, heatmap_rows: int = 6) -> list[Path]:
    """curves.png over all runs and the heatmaps of the last logged step's samples of the
    first run that has samples. Returns the files written."""
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plot_curves(runs, out_dir / "curves.png"):
        written.append(out_dir / "curves.png")
    with_samples = [run for run in runs if run["samples"]]
    if with_samples:
        samples = with_samples[0]["samples"]
        last = max(s["step"] for s in samples)
        shown = [s for s in samples if s["step"] == last][:heatmap_rows]
        heatmap_html(shown, out_dir / "heatmap.html")
        written.append(out_dir / "heatmap.html")
        if heatmap_png(shown, out_dir / "heatmap.png"):
            written.append(out_dir / "heatmap.png")
    if not any(path.suffix == ".png" for path in written):
        print("matplotlib is not installed: no PNGs (pip install 'oar-kernels[demo]')")
    return written
