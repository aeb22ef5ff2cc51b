"""viz's pictures: the HTML heatmap read back by a parser (and laid out by a real browser when
chromium is installed), the PNG's colours and line breaks, and its errors."""

from __future__ import annotations

import html.parser
import importlib.util
import json
import random
import re
import shutil
import subprocess

import pytest
import yaml

from oar_kernels.grpo import task, viz
from oar_kernels.grpo.loop import METRICS, SAMPLES

SOLUTION = task.make_problem(random.Random(1)).solution
TRICKY = ["\n", "<eos>", "<script>", "a&b", "'\"", ""]  # escaping and visible whitespace


def make_samples(count: int = 4, seed: int = 0) -> list[dict]:
    """Completions as the loop logs them: character tokens of a solution (plus TRICKY ones in
    the third), weights over the whole scale, the answer unscored, a departure marked."""
    rng = random.Random(seed)
    samples = []
    for row in range(count):
        tokens = [*SOLUTION, "<eos>"]
        if row == 2:
            tokens[10:10] = TRICKY
        answer_from = "".join(tokens).index("So")
        scored, length = [], 0
        for token in tokens:
            scored.append(length < answer_from)
            length += len(token)
        samples.append(
            {
                "step": 3,
                "method": "oar-g",
                "reward": float(row != 2),
                "advantage": -1.2 if row == 2 else 0.7,
                "tokens": tokens,
                "weights": [round(rng.uniform(0.05, 2.5), 4) for _ in tokens],
                "scored": scored,
                "filler": [False] * len(tokens),
                "departure": 6 if row == 2 else None,
            }
        )
    return samples


class _Blocks(html.parser.HTMLParser):
    """The completion blocks of a heatmap page: per block its classes, its text and its token
    spans' [title, text]."""

    def __init__(self):
        super().__init__()
        self.blocks, self.in_tokens, self.span = [], False, None

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag == "section" and "completion" in classes:
            self.blocks.append({"classes": classes, "tokens": [], "text": ""})
        elif tag == "div" and "tokens" in classes:
            self.in_tokens = True
        elif self.in_tokens:
            assert tag == "span", f"an element <{tag}> among a completion's tokens"
            self.span = [dict(attrs).get("title"), ""]
            self.blocks[-1]["tokens"].append(self.span)

    def handle_endtag(self, tag):
        if tag == "span":
            self.span = None
        elif tag == "div":
            self.in_tokens = False

    def handle_data(self, data):
        if self.span is not None:
            self.span[1] += data
        if self.blocks:
            self.blocks[-1]["text"] += data


def parse(page: str) -> list[dict]:
    parser = _Blocks()
    parser.feed(page)
    return parser.blocks


def test_html_heatmap_has_one_block_per_completion_with_every_token_once(tmp_path):
    samples = make_samples()
    samples[0] = {**samples[0], "prompt": "Q: 1+2=?\n", "answer": 3}
    viz.heatmap_html(samples, tmp_path / "h.html")
    page = (tmp_path / "h.html").read_text()
    blocks = parse(page)
    assert len(blocks) == len(samples)
    for block, sample in zip(blocks, samples):
        assert [text for _, text in block["tokens"]] == [viz.glyph(t) for t in sample["tokens"]]
        weights = [float(re.search(r"weight (\S+)", title)[1]) for title, _ in block["tokens"]]
        assert weights == sample["weights"]  # the tooltip holds the logged weight
        assert ("right" if sample["reward"] else "wrong") in block["classes"]
    assert "prompt: Q: 1+2=?" in blocks[0]["text"] and "expected answer 3" in blocks[0]["text"]
    # tokens are escaped (no <script> or <eos> element) and newlines are drawn, not broken
    assert "<script>" not in page and "&lt;eos&gt;" in page and "↵" in page
    runs = re.findall(r"<div class=tokens>(.*?)</div>", page, re.DOTALL)
    assert len(runs) == len(samples) and not any("\n" in run for run in runs)  # inline


def test_colours_keep_text_readable_and_white_means_unchanged():
    assert viz.weight_rgb(1.0) == (247, 247, 247)
    assert viz.text_rgb(viz.weight_rgb(0.0)) == (255, 255, 255)  # darkest blue
    assert viz.text_rgb(viz.weight_rgb(2.0)) == (255, 255, 255)  # darkest red
    assert viz.text_rgb(viz.weight_rgb(3.0)) == (255, 255, 255)  # clipped to the scale
    assert viz.text_rgb(viz.weight_rgb(1.0)) == (0, 0, 0)
    assert viz.text_rgb(viz.weight_rgb(5.0, scored=False)) == (0, 0, 0)


def test_png_lines_break_between_words_and_cells_fit_their_glyphs():
    cells = viz._cells(make_samples(1)[0])
    lines = viz._wrap(cells, 30)
    assert [c for line in lines for c in line] == cells
    for line in lines:
        assert sum(len(viz.glyph(c["text"])) for c in line) <= 30
    for line in lines[:-1]:
        assert line[-1]["text"] == " "  # every line but the last ends after a space
    long_word = viz._cells({**make_samples(1)[0], "tokens": ["x"] * 70 + [" ", "<eos>"]})
    assert [len(line) for line in viz._wrap(long_word, 30)] == [30, 30, 12]  # x*10, " ", <eos>


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="needs matplotlib")
def test_png_heatmap_and_curves_are_written(tmp_path):
    samples = make_samples()
    assert viz.heatmap_png(samples, tmp_path / "h.png")
    run = {"dir": tmp_path / "oar-g-seed0", "config": {"method": "oar-g"}}
    metrics = [{"step": s, "reward": s / 4, "eval_accuracy": s / 5} for s in range(4)]
    assert viz.plot_curves([{**run, "metrics": metrics}], tmp_path / "c.png")
    for name in ("h.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def write_run(directory, samples, **config) -> None:
    directory.mkdir(parents=True)
    values = {"method": "oar-g", "seed": 0, "digits": 3, "prompts_per_step": 2}
    (directory / "config.yaml").write_text(
        yaml.safe_dump({**values, "num_generations": 4, **config})
    )
    (directory / METRICS).write_text(json.dumps({"step": 0, "eval_accuracy": 0.5}) + "\n")
    (directory / SAMPLES).write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_render_shows_the_prompt_the_loop_drew_for_an_older_run(tmp_path):
    """samples.jsonl without prompts: the step's problems are drawn again; a sample is given
    its prompt only when the drawn answer explains its reward."""
    problems = viz._drawn_problems(
        {"seed": 0, "digits": 3, "prompts_per_step": 2, "num_generations": 4}, 3, 5
    )
    samples = make_samples(5)
    for sample, problem in zip(samples, problems):
        sample["tokens"] = [*problem.solution, "<eos>"]
        sample["scored"] = [True] * len(sample["tokens"])
        sample["weights"] = [1.0] * len(sample["tokens"])
        sample["reward"] = 1.0
    write_run(tmp_path / "run", samples)
    viz.render([tmp_path / "run"], tmp_path / "out")
    blocks = parse((tmp_path / "out" / "heatmap.html").read_text())
    assert f"prompt: {problems[0].prompt.strip()}" in blocks[0]["text"]
    assert f"prompt: {problems[4].prompt.strip()}" in blocks[4]["text"]
    assert problems[0] != problems[4]  # rows 0-3 answer the first problem, row 4 the second

    samples[0]["reward"] = 0.0  # not what the drawn answer gives: no prompt is guessed
    write_run(tmp_path / "other", samples)
    viz.render([tmp_path / "other"], tmp_path / "out2")
    assert "prompt:" not in (tmp_path / "out2" / "heatmap.html").read_text()


def test_a_directory_that_is_not_a_run_is_named_with_its_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run directory") as error:
        viz.render([tmp_path], tmp_path / "out")
    assert str(tmp_path / "config.yaml") in str(error.value)


def test_the_cli_reports_a_directory_that_is_not_a_run_as_a_usage_error(tmp_path, capsys):
    from oar_kernels.cli import main

    assert main(["viz", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("oar-kernels viz: error:") and "is not a run directory" in message


# -- in a real browser ---------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MEASURE = """<script>
const tokens = [...document.querySelectorAll('.completion .tokens')];
const lines = tokens.map(t => t.getBoundingClientRect().height
                              / parseFloat(getComputedStyle(t).lineHeight));
const pre = document.createElement('pre');
pre.id = 'measured';
pre.textContent = JSON.stringify({lines, width: innerWidth});
document.body.append(pre);
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (apt-get install chromium)")
def test_a_browser_lays_each_completion_out_in_a_few_lines(tmp_path):
    samples = make_samples(6)
    viz.heatmap_html(samples, tmp_path / "h.html")
    page = tmp_path / "measured.html"
    page.write_text((tmp_path / "h.html").read_text() + MEASURE)
    dom = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,1600",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    measured = json.loads(html.unescape(re.search(r"<pre id=\"measured\">(.*?)</pre>", dom)[1]))
    assert len(measured["lines"]) == 6
    # ~95 characters a completion at ~9 px a character in a 60-em column: 1 to 3 lines (each
    # token on its own line would make ~95)
    assert all(0.9 < lines < 3.5 for lines in measured["lines"]), measured


def test_every_study_arm_and_method_has_its_own_colour_and_dashes():
    from oar_kernels.grpo.config import METHODS
    from oar_kernels.grpo.study import ARMS

    styles = {arm: viz._style(arm) for arm in {*ARMS, *METHODS}}
    assert all(style["color"] for style in styles.values())
    assert len({(s["color"], s["linestyle"]) for s in styles.values()}) == len(styles)
    assert styles["oar-g-shuffled"]["color"] == styles["oar-g"]["color"]  # a control: dashed
