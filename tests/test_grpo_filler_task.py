"""The filler task: fillers are drawn from letters the task never uses, never change the
answer or the reward, and F = 0 is the plain task."""

import random

import pytest

from oar_kernels.grpo import task


def test_zero_fillers_is_the_plain_task():
    for seed in range(3):
        assert task.make_dataset(20, seed, fillers=0) == task.make_dataset(20, seed)
        plain, filler_rng = random.Random(seed), random.Random(99)
        assert task.make_problem(random.Random(seed)) == task.make_problem(
            plain, fillers=0, filler_rng=filler_rng
        )


@pytest.mark.parametrize("fillers", [1, 8, 24])
def test_fillers_never_change_the_answer_or_the_reward(fillers):
    plain = task.make_dataset(40, seed=5)
    padded = task.make_dataset(40, seed=5, fillers=fillers)
    for p, f in zip(plain, padded):
        assert (f.prompt, f.answer) == (p.prompt, p.answer)  # the operands do not move
        assert task.strip_fillers(f.solution) == p.solution
        assert len(f.solution) - len(p.solution) == task.filler_tokens(3, fillers)
        assert task.parse_answer(f.solution) == f.answer
        assert task.reward(f.solution, f.answer) == 1.0
        assert task.reward(f.solution, f.answer + 1) == 0.0
        # inserting fillers anywhere outside the boxed answer changes nothing either
        cut = f.solution.index("\\boxed")
        assert task.reward(f.solution[:cut] + "fghjklmn" + f.solution[cut:], f.answer) == 1.0


def test_fillers_are_letters_the_task_never_uses():
    assert len(set(task.FILLERS)) == len(task.FILLERS) == 8  # ln 8 nats per filler
    assert set(task.FILLERS) <= set(task.ALPHABET)
    for problem in task.make_dataset(200, seed=1):
        assert not set(task.FILLERS) & set(problem.prompt + problem.solution)
    used = "".join(task.make_dataset(50, seed=2, fillers=24)[0].solution.split("\\boxed")[0])
    assert set(task.FILLERS) <= set(used)  # all eight are drawn


def test_fillers_sit_before_each_column_step_and_before_so():
    problem = task.make_problem(random.Random(0), fillers=3, filler_rng=random.Random(1))
    chunks = problem.solution.split(" ")
    starts = [c for c in chunks if c[:3] and set(c[:3]) <= set(task.FILLERS)]
    assert len(starts) == 4  # three column steps and "So"
    assert any(c.endswith("So") and len(c) == 5 for c in chunks)
