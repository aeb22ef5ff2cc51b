"""The embedded arithmetic task, its tokenizer and its reward."""

import random

import pytest

from oar_kernels.grpo import task


def test_solutions_are_right_and_end_in_a_boxed_answer():
    for problem in task.make_dataset(50, seed=0):
        a, b = problem.prompt[3:-3].split("+")
        assert problem.answer == int(a) + int(b)
        assert task.reward(problem.solution, problem.answer) == 1.0
        assert task.reward(problem.solution, problem.answer + 1) == 0.0


def test_dataset_is_seeded():
    assert task.make_dataset(5, seed=1) == task.make_dataset(5, seed=1)
    assert task.make_dataset(5, seed=1) != task.make_dataset(5, seed=2)


def test_tokenizer_round_trips_every_character():
    tokenizer = task.build_tokenizer()
    problem = task.make_problem(random.Random(3))
    text = problem.prompt + problem.solution
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


@pytest.mark.parametrize(
    "completion, parsed",
    [
        ("so \\boxed{579}", 579),
        ("\\boxed{1} then \\boxed{12}", 12),
        ("\\boxed{-4}", -4),
        ("no answer", None),
        ("\\boxed{__import__('os')}", None),  # parsed as text, never evaluated
        ("\\boxed{1+2}", None),
        ("\\boxed{}", None),
        ("\\boxed{12", None),
    ],
)
def test_answer_parsing_is_safe(completion, parsed):
    assert task.parse_answer(completion) == parsed
