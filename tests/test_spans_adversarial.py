"""Answer finding on adversarial completions: the built-in formats scan in linear time, agree
with the regexes they replaced, and max_chars bounds a backtracking user regex."""

import re
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oar_kernels import spans

N = 100_000


def _repeat(piece: str, tail: str = "") -> str:
    """piece repeated to N characters, then tail."""
    return (piece * (N // len(piece) + 1))[: N - len(tail)] + tail


# Each targets a format's worst case: unclosed openers, long whitespace runs after markup,
# unbalanced or nested braces, marker runs, and whitespace the regex `.` matches but `$` not.
ADVERSARIAL = {
    "answer openers": _repeat("<answer>"),
    "answer then spaces": "<answer>" + _repeat(" "),
    "answer then spaces, near-closer": "<answer>" + _repeat(" ", "</answer"),
    "answer then word and spaces": "<answer> 7" + _repeat(" \n"),
    "answer openers and spaces, one closer": _repeat("<answer> ", "</answer>"),
    "markers": _repeat("####"),
    "marker then whitespace": "####" + _repeat(" \n\t"),
    "marker lines": _repeat("#### \n"),
    "markers and words on one line": _repeat("#### a    "),
    "marker then line separators": "#### 7" + _repeat("\u2028"),
    "boxed openers": _repeat("\\boxed{"),
    "boxed then open braces": "\\boxed{" + _repeat("{"),
    "boxed then close braces": "\\boxed{" + _repeat("}"),
    "nested boxed": _repeat("\\boxed{", "}" * 100),
    "all markups": _repeat("\\boxed{<answer>#### {"),
    "spaces": _repeat(" "),
}


def _run_within(seconds: float, fn):
    """fn(), failing once it runs past `seconds` (re checks for signals while it matches)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", list(ADVERSARIAL))
@pytest.mark.parametrize("fmt", ["boxed", "gsm8k", "answer_tag"])
def test_builtin_formats_run_in_linear_time(fmt, name):
    text = ADVERSARIAL[name]
    assert len(text) >= N
    _run_within(1.0, lambda: spans.find_answer(text, fmt))


# The regexes the gsm8k and answer_tag scanners replaced: same results, without backtracking.
FORMER_REGEXES = {
    "gsm8k": re.compile(r"####\s*(\S(?:.*\S)?)\s*$", re.MULTILINE),
    "answer_tag": re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL),
}
PIECES = ["<answer>", "</answer>", "####", "#", "<", "a", "7", " ", "\n", "\t", "\r", "\xa0"]
PIECES += ["\x85", "\u2028", "\x1c"]  # whitespace to `\s`, yet `.` matches it and `$` does not


@given(st.lists(st.sampled_from(PIECES), max_size=24).map("".join))
def test_scanners_match_the_former_regexes(text):
    for fmt, regex in FORMER_REGEXES.items():
        matches = list(regex.finditer(text))
        expected = (matches[-1].start(0), *matches[-1].span(1)) if matches else None
        assert spans.find_answer(text, fmt) == expected, (fmt, text)


def test_max_chars_bounds_a_backtracking_user_regex():
    cubic = r"(.*?)\s*!"  # from each start, .*? and \s* split a run of spaces every way
    text = " " * N
    with pytest.raises(TimeoutError):
        _run_within(0.2, lambda: spans.find_answer(text, cubic))
    assert _run_within(1.0, lambda: spans.find_answer(text, cubic, max_chars=200)) is None


def test_max_chars_searches_the_tail_with_offsets_in_the_whole_text():
    text = "ANSWER: 1 " + "x" * 5000 + " so ANSWER: 42"
    start = text.rindex("42")
    assert spans.find_answer(text, r"ANSWER: (\d+)", max_chars=20) == (start - 8, start, start + 2)
    assert spans.find_answer(text, r"ANSWER: (\d+)", max_chars=3) is None
    assert spans.find_answer(text, re.compile(r"\bso (\w+)"), max_chars=14) is not None
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_chars"):
            spans.find_answer(text, r"(\d)", max_chars=bad)
    for bad in (2.5, True, "5"):
        with pytest.raises(TypeError, match="max_chars"):
            spans.find_answer(text, r"(\d)", max_chars=bad)
