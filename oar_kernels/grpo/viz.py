"""Pictures of runs: reward / held-out accuracy curves per method (PNG) and a heatmap of
OAR's token weights over sampled completions (HTML, and PNG).

    oar-kernels viz runs/demo/*            # writes curves.png, heatmap.html, heatmap.png

PNGs need matplotlib (`pip install 'oar-kernels[demo]'`); the HTML heatmap needs nothing.
"""

from __future__ import annotations

import html
import random
import re
from pathlib import Path
from types import SimpleNamespace

from oar_kernels.grpo import loop, task
from oar_kernels.grpo.loop import METRICS, SAMPLES, read_jsonl

COLORS = {
    "grpo": "#4c72b0",
    "oar-g": "#dd8452",
    "oar-p": "#55a868",
    "oar-g-authors": "#8c564b",
    "oar-p-authors": "#17becf",
}
# A control is drawn in its method's colour with its own dashes.
DASHES = {"shuffled": "--", "inverted": ":"}


def _style(label: str) -> dict:
    """Colour and line style of an arm: its own, or its method's dashed for a control."""
    method, _, control = label.rpartition("-")
    if control in DASHES and method in COLORS:
        return {"color": COLORS[method], "linestyle": DASHES[control]}
    return {"color": COLORS.get(label), "linestyle": "-"}


CONFIG = "config.yaml"
WRAP = 112  # character cells per heatmap.png line: a plain-task completion fits one
CELL_INCHES = 0.085  # a cell's width: a 9 pt monospace glyph's (5.4 pt) and a little air
# The weight colour scale, shared by the HTML and the PNG: (weight, RGB) anchors, linear in
# between; weight 1 (an unchanged advantage) is white, heavier weights clip at the last.
SCALE = (
    (0.0, (33, 102, 172)),
    (0.5, (146, 197, 222)),
    (1.0, (247, 247, 247)),
    (1.5, (244, 165, 130)),
    (2.0, (178, 24, 43)),
)
UNSCORED = (221, 221, 221)  # the answer's tokens: OAR leaves them unweighted
GLYPHS = {"\n": "↵", "\t": "⇥", "\r": "␍"}  # whitespace a reader must see


class NotARunError(FileNotFoundError):
    """A directory given to viz that train or demo did not write."""


def load_run(run_dir: str | Path) -> dict:
    """config, metrics and samples of one run directory (as `train` wrote them); a line
    torn by a crash is skipped with a warning."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG
    if not config_path.is_file():
        raise NotARunError(
            f"{run_dir} is not a run directory: {config_path} is missing (train and demo "
            f"write {CONFIG}, {METRICS} and {SAMPLES} into each run's directory)"
        )
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


def _seed_mean(series: list[list[tuple[int, float]]]) -> tuple[list[int], list[float]]:
    """Steps and the mean over seeds of (step, value) series, over the steps all share."""
    common = min(len(points) for points in series)
    steps = [series[0][i][0] for i in range(common)]
    return steps, [sum(points[i][1] for points in series) / len(series) for i in range(common)]


def plot_curves(runs: list[dict], path: Path) -> bool:
    """Train reward (5-step running mean) and held-out accuracy per method; one thin line
    per seed, the seeds' mean thick, labelled in each panel's legend. Returns False when
    matplotlib is missing."""
    plt = _matplotlib()
    if plt is None:
        return False
    fig, (ax_reward, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(_label(run), []).append(run)
    for method, group in by_method.items():
        style = _style(method)
        rewards, evals = [], []
        for run in group:
            trained = [r for r in run["metrics"] if "reward" in r]
            smooth = _smooth([r["reward"] for r in trained])
            rewards.append([(r["step"], v) for r, v in zip(trained, smooth)])
            evals.append(
                [(r["step"], r["eval_accuracy"]) for r in run["metrics"] if "eval_accuracy" in r]
            )
        label = f"{method} (mean of {len(group)})" if len(group) > 1 else method
        for ax, series in ((ax_reward, rewards), (ax_eval, evals)):
            series = [points for points in series if points]
            if not series:
                continue
            for points in series if len(series) > 1 else ():
                ax.plot(*zip(*points), **style, lw=0.7, alpha=0.5)
            ax.plot(
                *_seed_mean(series),
                **style,
                lw=2.5 if len(series) > 1 else 1.5,
                marker="." if len(series[0]) < 3 else None,
                label=label,
            )
    ax_reward.set(title="train reward (sampled, running mean)", xlabel="step", ylabel="reward")
    ax_eval.set(title="held-out pass@1 (sampled)", xlabel="step", ylabel="accuracy")
    for ax in (ax_reward, ax_eval):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                title="thin: one seed" if any(len(g) > 1 for g in by_method.values()) else None
            )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the weight heatmap --------------------------------------------------------------------
def weight_rgb(weight: float, scored: bool = True) -> tuple[int, int, int]:
    """The fill of a token of this weight on SCALE (grey when not scored)."""
    if not scored:
        return UNSCORED
    weight = min(max(weight, SCALE[0][0]), SCALE[-1][0])
    for (low, low_rgb), (high, high_rgb) in zip(SCALE, SCALE[1:]):
        if weight <= high:
            t = (weight - low) / (high - low)
            return tuple(round(a + t * (b - a)) for a, b in zip(low_rgb, high_rgb))
    raise AssertionError("unreachable: the weight is clipped to the scale")


def text_rgb(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with `fill` (WCAG relative luminance)."""

    def linear(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in fill)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # contrast with white (1.05 / (L + 0.05)) beats contrast with black ((L + 0.05) / 0.05)
    return (255, 255, 255) if luminance < 0.179 else (0, 0, 0)


def glyph(token: str) -> str:
    """A token as shown: newlines and tabs visible, an empty token as a thin mark."""
    return "".join(GLYPHS.get(c, c) for c in token) or "∅"


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _cells(sample: dict) -> list[dict]:
    """One dict per completion token: text, weight, scored, filler, departure."""
    tokens = sample["tokens"]
    fillers = sample.get("filler") or [False] * len(tokens)
    cells = zip(tokens, sample["weights"], sample["scored"], fillers)
    return [
        {
            "text": t,
            "weight": w,
            "scored": s,
            "filler": f,
            "departure": i == sample.get("departure"),
        }
        for i, (t, w, s, f) in enumerate(cells)
    ]


def _verdict(sample: dict) -> str:
    """right / wrong from the reward (1 for an exactly right answer, task.reward)."""
    return "right" if sample["reward"] > 0 else "wrong"


def _tooltip(cell: dict) -> str:
    notes = [] if cell["scored"] else ["not scored: the answer"]
    notes += ["filler"] if cell["filler"] else []
    notes += ["first departure from the reference"] if cell["departure"] else []
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{cell['text']!r}: weight {cell['weight']:.4f}{extra}"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:62em;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:.2em 0}
p.about{margin:.4em 0 .8em;line-height:1.4}
.legend{display:flex;flex-wrap:wrap;align-items:flex-start;gap:.4em 1.6em;font-size:13px}
.scale{position:relative;width:22em;height:2.4em}
.scale .bar{height:1em;border:1px solid #888}
.scale .tick{position:absolute;top:1.15em;transform:translateX(-50%)}
.key{font-family:monospace;font-size:14px;padding:1px 3px}
.completion{border:1px solid #ccc;border-left-width:6px;border-radius:3px;padding:.5em .8em;
 margin:.9em 0}
.completion.right{border-left-color:#2ca02c}.completion.wrong{border-left-color:#d62728}
.head{font-weight:600}.head .right{color:#1a7f1a}.head .wrong{color:#c11}
.prompt{font-family:monospace;color:#444;margin:.25em 0 .35em}
.tokens{font-family:monospace;font-size:15px;line-height:1.75;white-space:pre-wrap;
 overflow-wrap:anywhere}
.tokens span{padding:1px 0}
.filler{font-style:italic}.departure{outline:2px solid #000;outline-offset:-1px}
"""


def _legend_html() -> str:
    top = SCALE[-1][0]
    gradient = ",".join(f"{_hex(rgb)} {100 * w / top:g}%" for w, rgb in SCALE)
    ticks = "".join(
        f"<span class=tick style='left:{100 * w / top:g}%'>{w:g}{'+' if w == top else ''}</span>"
        for w, _ in SCALE
    )
    grey = _hex(UNSCORED)
    return (
        "<div class=legend><div><div>token weight (hover a token for its exact value)</div>"
        "<div class=scale><div class=bar style='background:linear-gradient(to right,"
        f"{gradient})'></div>"
        f"{ticks}</div></div>"
        f"<div><span class=key style='background:{grey}'>So \\boxed{{…}}</span> not scored "
        f"(the answer)<br><span class='key filler'>fgh</span> filler &nbsp; "
        "<span class='key departure'>7</span> a wrong completion's first token off the "
        "reference</div></div>"
    )


def _completion_html(sample: dict) -> str:
    verdict = _verdict(sample)
    head = (
        f"{html.escape(str(sample['method']))}, step {sample['step']}: "
        f"<span class={verdict}>{verdict}</span> (reward {sample['reward']:g}), "
        f"GRPO advantage {sample['advantage']:+.2f}"
    )
    prompt = ""
    if sample.get("prompt") is not None:
        answer = sample.get("answer")
        expected = "" if answer is None else f" &nbsp; expected answer {html.escape(str(answer))}"
        prompt = (
            "<div class=prompt>prompt: "
            f"{html.escape(glyph(sample['prompt'].rstrip(chr(10))))}{expected}</div>"
        )
    spans = []
    for cell in _cells(sample):
        fill = weight_rgb(cell["weight"], cell["scored"])
        classes = " ".join(k for k in ("filler", "departure") if cell[k])
        spans.append(
            f"<span{f' class={chr(34)}{classes}{chr(34)}' if classes else ''} "
            f'style="background:{_hex(fill)};color:{_hex(text_rgb(fill))}" '
            f'title="{html.escape(_tooltip(cell))}">{html.escape(glyph(cell["text"]))}</span>'
        )
    return (
        f"<section class='completion {verdict}'><div class=head>{head}</div>{prompt}"
        f"<div class=tokens>{''.join(spans)}</div></section>"
    )


def heatmap_html(samples: list[dict], path: Path, title: str = "OAR token weights") -> None:
    """One block per completion: its prompt, whether it was right, and its tokens flowing
    inline on a background by Bi-Level weight; hover a token for its weight."""
    top = SCALE[-1][0]
    parts = [
        "<!doctype html><html lang=en><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class=about>Each completion's tokens on a background by their OAR weight, which "
        "multiplies the rollout's GRPO advantage: red boosted (pivotal), blue damped, white "
        f"unchanged (1); weights above {top:g} are drawn as {top:g}. Over the scored span "
        "the weights average 1.</p>",
        _legend_html(),
        *(_completion_html(sample) for sample in samples),
    ]
    Path(path).write_text("\n".join(parts) + "\n")


def _wrap(cells: list[dict], width: int) -> list[list[dict]]:
    """Lines of at most `width` character cells, broken after a space, so words stay whole
    (a word longer than a line is cut); a token takes as many cells as its glyph has
    characters, so `<eos>` does not overlap its neighbour."""
    words, word = [], []
    for cell in cells:
        word.append(cell)
        if cell["text"].isspace():
            words.append(word)
            word = []
    words += [word] if word else []
    lines, line, used = [], [], 0
    for word in words:
        size = sum(len(glyph(c["text"])) for c in word)
        if used + size > width and line:
            lines.append(line)
            line, used = [], 0
        while size > width:  # a word longer than a line
            cut = 0
            while cut < len(word) and used + len(glyph(word[cut]["text"])) <= width:
                used += len(glyph(word[cut]["text"]))
                cut += 1
            cut = max(cut, 1)
            lines.append(line + word[:cut])
            word, line, used = word[cut:], [], 0
            size = sum(len(glyph(c["text"])) for c in word)
        line += word
        used += size
    return lines + ([line] if line else [])


def _png_rows(samples: list[dict]) -> list[tuple[str, object]]:
    """The heatmap.png's rows, top to bottom: ("head", sample), ("prompt", sample) when
    the prompt is known, ("cells", line), ("gap", None) between completions."""
    rows = []
    for sample in samples:
        rows.append(("head", sample))
        if sample.get("prompt") is not None:
            rows.append(("prompt", sample))
        rows += [("cells", line) for line in _wrap(_cells(sample), WRAP)]
        rows.append(("gap", None))
    return rows[:-1]


def _tex_safe(text: str) -> str:
    return text.replace("$", r"\$")


def heatmap_png(samples: list[dict], path: Path) -> bool:
    """The heatmap as an image: per completion, a header (right or wrong, reward,
    advantage), its prompt, then its tokens as character cells, lines broken between
    words; text black or white by the fill's luminance."""
    plt = _matplotlib()
    if plt is None:
        return False
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    top = SCALE[-1][0]
    cmap = LinearSegmentedColormap.from_list(
        "oar_weight", [(w / top, tuple(c / 255 for c in rgb)) for w, rgb in SCALE]
    )
    rows = _png_rows(samples)
    heights = {"head": 0.95, "prompt": 0.85, "cells": 1.0, "gap": 0.45}
    total = sum(heights[kind] for kind, _ in rows)
    fig, ax = plt.subplots(figsize=(WRAP * CELL_INCHES + 1.2, total * 0.27 + 0.4))
    ax.set_xlim(0, WRAP)
    ax.set_ylim(total, 0)
    ax.axis("off")
    y = 0.0
    for kind, content in rows:
        if kind == "head":
            verdict = _verdict(content)
            ax.text(
                0,
                y + 0.7,
                f"{content['method']}, step {content['step']}: ",
                fontsize=9.5,
                weight="bold",
            )
            ax.annotate(
                f"{verdict} (reward {content['reward']:g}), "
                f"GRPO advantage {content['advantage']:+.2f}",
                xycoords=ax.texts[-1],
                xy=(1, 0),
                va="bottom",
                fontsize=9.5,
                weight="bold",
                color="#1a7f1a" if verdict == "right" else "#c11",
            )
        elif kind == "prompt":
            answer = content.get("answer")
            expected = "" if answer is None else f"    expected answer {answer}"
            ax.text(
                0,
                y + 0.6,
                _tex_safe(f"prompt: {glyph(content['prompt'].rstrip())}{expected}"),
                fontsize=9,
                family="monospace",
                color="0.3",
            )
        elif kind == "cells":
            x = 0
            for cell in content:
                shown = glyph(cell["text"])
                width = len(shown)
                fill = weight_rgb(cell["weight"], cell["scored"])
                ax.add_patch(
                    plt.Rectangle(
                        (x, y + 0.08), width, 0.84, lw=0, color=tuple(c / 255 for c in fill)
                    )
                )
                if cell["departure"]:  # a wrong completion's first token off the reference
                    ax.add_patch(plt.Rectangle((x, y + 0.08), width, 0.84, fill=False, lw=1.5))
                ax.text(
                    x + width / 2,
                    y + 0.52,
                    _tex_safe(shown),
                    ha="center",
                    va="center",
                    family="monospace",
                    fontsize=9,
                    color=tuple(c / 255 for c in text_rgb(fill)),
                    style="italic" if cell["filler"] else "normal",
                )
                x += width
        y += heights[kind]
    bar = fig.colorbar(
        plt.cm.ScalarMappable(norm=Normalize(0, top), cmap=cmap), ax=ax, fraction=0.025, pad=0.01
    )
    bar.set_label("OAR weight (grey: not scored)")
    bar.set_ticks([w for w, _ in SCALE], labels=[f"{w:g}" for w, _ in SCALE[:-1]] + [f"{top:g}+"])
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return True


# -- which problem a sample answered -------------------------------------------------------
def with_problems(run: dict, samples: list[dict]) -> list[dict]:
    """`samples` (one step's, in the order logged) with "prompt" and "answer" filled in.
    samples.jsonl records them when the loop does; for a run that does not, the step's
    problems are drawn again as the loop drew them (`prompts_per_step` seeded problems,
    `num_generations` rows each, the logged samples being the step's first rows), and kept
    only where the drawn answer gives each sample its logged reward."""
    if all(s.get("prompt") is not None for s in samples):
        return samples
    try:
        drawn = _drawn_problems(run["config"], samples[0]["step"], len(samples))
    except (KeyError, TypeError, ValueError):
        return samples
    agree = all(
        task.reward("".join(s["tokens"]), problem.answer) == s["reward"]
        for s, problem in zip(samples, drawn)
    )
    if not agree:
        return samples
    return [
        {**s, "prompt": problem.prompt, "answer": problem.answer} if s.get("prompt") is None else s
        for s, problem in zip(samples, drawn)
    ]


def _drawn_problems(config: dict, step: int, rows: int) -> list[task.Problem]:
    """The problems of a step's first `rows` rollouts, drawn as `Trainer._train_step` does."""
    rng = random.Random(loop._step_seed(SimpleNamespace(seed=config["seed"]), step))
    problems = [task.make_problem(rng, config["digits"]) for _ in range(config["prompts_per_step"])]
    group = config["num_generations"]
    return [problems[row // group] for row in range(min(rows, len(problems) * group))]


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
        run = with_samples[0]
        last = max(s["step"] for s in run["samples"])
        shown = with_problems(run, [s for s in run["samples"] if s["step"] == last])
        shown = shown[:heatmap_rows]
        heatmap_html(shown, out_dir / "heatmap.html")
        written.append(out_dir / "heatmap.html")
        if heatmap_png(shown, out_dir / "heatmap.png"):
            written.append(out_dir / "heatmap.png")
    if not any(path.suffix == ".png" for path in written):
        print("matplotlib is not installed: no PNGs (pip install 'oar-kernels[demo]')")
    return written
