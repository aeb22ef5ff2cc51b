"""The loop on the filler task, with a control method, logs the faithfulness metrics; the
study tabulates finished runs (a seconds-long untrained model: no warm start)."""

import os

import pytest

from oar_kernels import cli
from oar_kernels.grpo import study, task
from oar_kernels.grpo.config import ConfigError
from oar_kernels.grpo.loop import METRICS, SAMPLES, read_jsonl

TINY = dict(
    device="cpu",
    prompts_per_step=2,
    num_generations=2,
    max_new_tokens=8,
    eval_size=2,
    eval_samples=1,
    warm_start_max_steps=0,
    progress=False,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OAR_KERNELS_CACHE", str(tmp_path / "cache"))


def test_study_runs_log_faithfulness_and_finished_runs_are_reused(cache, tmp_path):
    out = tmp_path / "study"
    kwargs = dict(arms=("grpo", "oar-g-inverted"), fillers=(2,), seeds=2, steps=1, **TINY)
    summaries = study.run(out, **kwargs)
    table = (out / "results.md").read_text()
    assert "| 2 | oar-g-inverted | 2 |" in table and "sign-flip p" in table
    assert set(summaries[2]["grpo"]) == {0, 1}
    for arm in kwargs["arms"]:
        record = read_jsonl(out / "F2" / f"{arm}-seed0" / METRICS)[1]
        assert {"filler_weight_share", "filler_token_share", "ess_ratio"} <= set(record)
    assert summaries[2]["grpo"][0]["ess_ratio"] == pytest.approx(1.0)
    sample = read_jsonl(out / "F2" / "oar-g-inverted-seed0" / SAMPLES)[0]
    assert len(sample["filler"]) == len(sample["tokens"])
    # Each sample names its problem: the prompt's sum is the expected answer, which gives
    # the logged reward.
    a, b = sample["prompt"].removeprefix("Q: ").removesuffix("=?\n").split("+")
    assert sample["answer"] == int(a) + int(b)
    assert task.reward("".join(sample["tokens"]), sample["answer"]) == sample["reward"]
    metrics = out / "F2" / "grpo-seed0" / METRICS
    mtime = metrics.stat().st_mtime_ns
    study.run(out, **kwargs)  # finished runs are tabulated, not rerun
    assert metrics.stat().st_mtime_ns == mtime
    only = study.run(out, train_missing=False, **{**kwargs, "seeds": 3})
    assert set(only[2]["grpo"]) == {0, 1}  # seed 2 was never run: left out, not trained
    # The same directory asked for another configuration: an error naming the field, not
    # the old runs tabulated as the new ones; presentation-only fields do not count.
    with pytest.raises(study.StudyError, match=r"warmup_updates=10 \(asked 3\)"):
        study.run(out, warmup_updates=3, **kwargs)
    study.run(out, train_missing=False, **{**kwargs, "heatmap_samples": 1})


def test_cli_study_on_a_directory_of_other_runs_is_a_usage_error(cache, tmp_path, capsys):
    out = tmp_path / "study"
    kwargs = dict(arms=("grpo",), fillers=(2,), seeds=1, steps=1, **TINY)
    study.run(out, **kwargs)
    flags = ["study", "--out", str(out), "--arms", "grpo", "--fillers", "2", "--seeds", "1"]
    assert cli.main([*flags, "--steps", "1", "--no-progress"]) == 2  # the defaults differ
    assert "holds a finished run of another configuration" in capsys.readouterr().err


def test_cli_study_refuses_unknown_arms(capsys):
    with pytest.raises(SystemExit):
        cli.main(["study", "--arms", "grpo,ppo"])
    assert "must come from" in capsys.readouterr().err


def test_runs_trained_in_worker_processes_equal_runs_trained_in_process(cache, tmp_path):
    import torch

    kwargs = dict(arms=("grpo", "oar-g"), fillers=(2,), seeds=1, steps=2, **TINY)
    threads = torch.get_num_threads()
    torch.set_num_threads(study.worker_threads(2))  # the workers' count: same float sums
    try:
        serial = study.run(tmp_path / "serial", **kwargs)
    finally:
        torch.set_num_threads(threads)
    parallel = study.run(tmp_path / "parallel", workers=2, **kwargs)
    assert parallel == serial
    for way, trainer in (("serial", "this process"), ("parallel", "a worker")):
        lock = (tmp_path / way / "F2" / "grpo-seed0" / "train.lock").read_text()
        assert (lock.split()[1] == str(os.getpid())) == (trainer == "this process"), lock
    for arm in kwargs["arms"]:
        runs = [tmp_path / way / "F2" / f"{arm}-seed0" / METRICS for way in ("serial", "parallel")]
        drop = ("rollout_s", "advantage_s", "update_s")
        serial_lines, parallel_lines = (
            [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(p)] for p in runs
        )
        assert serial_lines == parallel_lines and len(serial_lines) == 3
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        study.run(tmp_path / "x", workers=0, **kwargs)
    with pytest.raises(ValueError, match="cannot go with train_missing=False"):
        study.run(tmp_path / "x", rerun=True, train_missing=False, **kwargs)


def test_a_failing_run_stops_a_parallel_study_with_its_error(cache, tmp_path, monkeypatch):
    kwargs = dict(arms=("grpo",), fillers=(2,), seeds=1, steps=1, **TINY)
    study.run(tmp_path / "study", **kwargs)  # the warm start, cached
    run_dir = tmp_path / "study" / "F2" / "grpo-seed0"
    (run_dir / "config.yaml").unlink()
    with pytest.raises(study.StudyError, match="no config.yaml"):
        study.run(tmp_path / "study", **kwargs)
    (run_dir / "config.yaml").write_text("method: ppo\n")
    with pytest.raises(study.StudyError, match=f"{run_dir}: method must be one of"):
        study.run(tmp_path / "study", **kwargs)
    # A run that fails in a worker (its out_dir is a file) stops the study with its error;
    # the runs not yet started are not started.
    (tmp_path / "bad" / "F2").mkdir(parents=True)
    (tmp_path / "bad" / "F2" / "grpo-seed1").write_text("in the way")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        study.run(tmp_path / "bad", workers=2, **{**kwargs, "seeds": 3})
    assert not (tmp_path / "bad" / "F2" / "grpo-seed2").exists()
