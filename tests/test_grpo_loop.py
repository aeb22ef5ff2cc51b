"""The reference GRPO loop: advantages, rollouts, config checks, a real short training run,
bit-identical resume, Ctrl-C checkpoints, the CLI's exit codes and the pictures."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from oar_kernels import cli
from oar_kernels.grpo import demo, study
from oar_kernels.grpo.config import ConfigError, TrainConfig
from oar_kernels.grpo.loop import (
    CHECKPOINT,
    METRICS,
    SAMPLES,
    Trainer,
    group_advantages,
    read_jsonl,
    train,
)
from oar_kernels.grpo.rollout import _assemble, make_rollouts
from oar_kernels.grpo.task import build_tokenizer

TIMINGS = {"rollout_s", "advantage_s", "update_s"}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One warm-start cache for the session, so each warm start is trained once."""
    return tmp_path_factory.mktemp("oar-cache")


@pytest.fixture
def cache(shared_cache, monkeypatch):
    monkeypatch.setenv("OAR_KERNELS_CACHE", str(shared_cache))
    return shared_cache


def quick(tmp_path, **overrides) -> TrainConfig:
    """A seconds-long run from the default (cached) warm start: small batches, on the CPU
    (where resume is promised to be bit-identical)."""
    values = dict(
        device="cpu",
        out_dir=str(tmp_path / "run"),
        prompts_per_step=2,
        num_generations=4,
        eval_size=8,
        progress=False,
    )
    return TrainConfig(**{**values, **overrides})


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group = group_advantages(rewards, 4, "group")
    first = rewards[:4] - 0.25
    torch.testing.assert_close(group[:4], first / (rewards[:4].std() + 1e-4))
    assert torch.equal(group[4:], torch.zeros(4))  # a group that all agrees teaches nothing
    batch = group_advantages(rewards, 4, "batch")
    torch.testing.assert_close(batch[:4], first / (rewards.std() + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], first)


def test_rollouts_cut_after_eos_and_left_pad_prompts():
    tok = build_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    a, b = tok.convert_tokens_to_ids(["1", "2"])
    out = _assemble(tok, [[a, b], [b]], [[a, eos, b, b], [b, b, b, b]])
    assert out.prompt_width == 2
    assert out.input_ids.tolist() == [[a, b, a, eos, pad, pad], [pad, b, b, b, b, b]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]]
    assert out.completion_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert out.texts == ["1", "2222"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_says_it_is_unavailable(tmp_path):
    with pytest.raises(RuntimeError, match=r"pip install 'oar-kernels\[vllm\]'"):
        make_rollouts("vllm", None, None, max_new_tokens=4, temperature=1.0, workdir=tmp_path)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"methd": "grpo"}, "unknown config key"),
        ({"method": "ppo"}, "method must be one of"),
        ({"steps": "ten"}, "steps must be int"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"progress": 1}, "progress must be bool"),
        ({"reshape_tau": 2.0}, "reshape_tau"),
    ],
)
def test_config_rejects_bad_values(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict(values)


def test_config_reads_yaml_and_flags_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: grpo\nsteps: 5\nlr: 1\n")
    config = TrainConfig.from_yaml(path, steps=7)
    assert (config.method, config.steps, config.lr) == ("grpo", 7, 1.0)


def test_yaml_exponent_floats_are_numbers(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; float fields take it as the number.
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-4\ntemperature: 7E-1\nsteps: 3\n")
    config = TrainConfig.from_yaml(path)
    assert (config.lr, config.temperature, config.steps) == (1e-4, 0.7, 3)
    for text, field in (("lr: fast", "lr"), ("lr: .nan", "lr"), ("steps: 1e1", "steps")):
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=field):
            TrainConfig.from_yaml(path)


def test_training_raises_held_out_accuracy_above_the_warm_start(cache, tmp_path):
    """The default task and model, a short OAR-G run on the CPU: held-out sampled pass@1 must
    rise above the warm start's (0.512 -> 0.594 on the 2-core dev machine)."""
    config = TrainConfig(
        method="oar-g", steps=20, eval_every=10, device="cpu", out_dir=str(tmp_path), progress=False
    )
    result = train(config)
    assert result.final_accuracy >= result.start_accuracy + 0.04, result
    records = read_jsonl(tmp_path / METRICS)
    assert [r["step"] for r in records] == list(range(21))
    assert all(0 <= r["eval_greedy"] <= 1 for r in records if "eval_accuracy" in r)
    trained = records[1:]
    for key in ("reward", "loss", "clip_fraction", "kl_to_old", "entropy", "top10_mass"):
        assert all(key in r and r[key] == r[key] for r in trained), key  # present, not NaN
    assert all(0.1 <= r["top10_mass"] <= 1 for r in trained)
    samples = read_jsonl(tmp_path / SAMPLES)
    assert samples and all(len(s["tokens"]) == len(s["weights"]) for s in samples)


@pytest.mark.parametrize("method", ["grpo", "oar-g", "oar-p"])
def test_resume_continues_bit_identically(cache, tmp_path, method):
    straight = quick(tmp_path / "a", method=method, steps=4, checkpoint_every=2, kl_beta=0.05)
    train(straight)
    half = quick(tmp_path / "b", method=method, steps=2, checkpoint_every=2, kl_beta=0.05)
    train(half)
    resumed = train(quick(tmp_path / "b", method=method, steps=4, kl_beta=0.05), resume=True)
    assert resumed.steps == 4
    a = torch.load(tmp_path / "a" / "run" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / CHECKPOINT, weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    # The half run also evaluated at its last step (2); everything else must agree.
    records = [read_jsonl(d / "run" / METRICS) for d in (tmp_path / "a", tmp_path / "b")]
    records[1][2].pop("eval_accuracy"), records[1][2].pop("eval_greedy")
    strip = [[{k: v for k, v in r.items() if k not in TIMINGS} for r in rs] for rs in records]
    assert strip[0] == strip[1]
    assert any(r["grad_norm"] > 0 for r in records[0][1:]), "nothing was learned: a vacuous test"


def test_resume_refuses_another_run(cache, tmp_path):
    train(quick(tmp_path, steps=1))
    with pytest.raises(ConfigError, match="lr"):
        train(quick(tmp_path, steps=2, lr=1e-3), resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(quick(tmp_path / "elsewhere", steps=2), resume=True)


def test_a_finished_run_is_not_overwritten_by_accident(cache, tmp_path):
    train(quick(tmp_path, steps=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(quick(tmp_path, steps=1))
    assert train(quick(tmp_path, steps=1, seed=3), overwrite=True).steps == 1
    assert read_jsonl(tmp_path / "run" / METRICS)[-1]["step"] == 1


def test_ctrl_c_saves_the_last_finished_step(cache, tmp_path, monkeypatch):
    trainer = Trainer(quick(tmp_path, steps=5, checkpoint_every=10))
    real_step = trainer._train_step

    def step_then_interrupt(step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(step)

    monkeypatch.setattr(trainer, "_train_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    saved = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert saved["step"] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--no-such-flag", "1"],
        ["train", "--steps", "ten"],
        ["demo", "--methods", "grpo,ppo"],
        ["viz"],
    ],
)
def test_cli_rejects_bad_flags_with_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read config file"),
        ("method: [grpo\n", "not valid YAML"),
        ("- 1\n- 2\n", "must hold a mapping"),
        ("learning_rate: 0.1\n", "unknown config key"),
        ("method: ppo\n", "method must be one of"),
    ],
)
def test_cli_rejects_bad_config_files_with_exit_code_2(tmp_path, capsys, content, match):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content)
    assert cli.main(["train", "--config", str(path)]) == 2
    assert match in capsys.readouterr().err


def test_cli_exit_codes_in_a_real_process(cache, tmp_path):
    run = [sys.executable, "-m", "oar_kernels"]
    bad = subprocess.run([*run, "train", "--method", "ppo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "method must be one of" in bad.stderr
    resume = subprocess.run(
        [*run, "train", "--resume", "--out-dir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert resume.returncode == 2 and "no checkpoint" in resume.stderr


def test_cli_demo_writes_table_metrics_and_pictures(cache, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seeds", "2", "--steps", "1", "--no-progress"]
    # The plain task (F = 0), whose warm start the other tests share; two worker processes.
    code = cli.main([*argv, "--arms", "grpo,oar-g", "--fillers", "0", "--workers", "2"])
    assert code == 0
    table = (out / "results.md").read_text()
    assert "| 0 | grpo | 2 |" in table and "| 0 | oar-g | 2 |" in table
    assert "(every run trained afresh)" in table
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["0"]) == ["grpo", "oar-g"] and sorted(results["0"]["grpo"]) == ["0", "1"]
    for run in ("grpo-seed0", "grpo-seed1", "oar-g-seed0", "oar-g-seed1"):
        assert len(read_jsonl(out / "F0" / run / METRICS)) == 2
    html = (out / "F0" / "heatmap.html").read_text()
    assert html.count("<section class='completion") == 6  # heatmap_samples
    if importlib.util.find_spec("matplotlib"):
        assert (out / "F0" / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "F0" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "2 arms x 2 seeds at F = 0, 1 steps" in capsys.readouterr().out
    # A demo starts afresh: its finished runs are trained again, not tabulated as they were.
    metrics = out / "F0" / "grpo-seed0" / METRICS
    mtime = metrics.stat().st_mtime_ns
    demo.run(out, arms=("grpo",), fillers=0, seeds=1, steps=1, workers=1, progress=False)
    assert metrics.stat().st_mtime_ns != mtime


def test_results_table_pairs_seeds_against_grpo():
    def run(auc):
        return {"auc": auc, "final": auc, **dict.fromkeys(study.FAITHFULNESS, 0.5)}

    summaries = {
        24: {
            "grpo": {s: run(v) for s, v in enumerate((0.5, 0.6, 0.7))},
            "oar-g": {s: run(0.7) for s in range(3)},
        }
    }
    table = study.results_table(summaries)
    ci = "0.600 [0.352, 0.848]"
    assert f"| 24 | grpo | 3 | {ci} | {ci} | — | — | — | — | 0.500 | 0.500 | 0.500 |" in table
    # oar-g - grpo per seed: +0.2, +0.1, 0: t interval 0.1 ± 4.303 * 0.1 / sqrt(3); half of
    # the 8 sign patterns reach |mean| >= 0.1 (the 0 flips to itself): p = 0.5
    assert "| 24 | oar-g | 3 | 0.700 [0.700, 0.700] |" in table
    assert "| +0.100 [-0.148, +0.348] | 0.500 | 2/3 | +1.00 |" in table


def test_confirmatory_family_holm_adjusts_over_the_declared_four():
    def arm(aucs):
        return {s: {"auc": v} for s, v in enumerate(aucs)}

    summaries = {
        24: {
            "grpo": arm([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),
            "oar-g": arm([0.6, 0.6, 0.6, 0.6, 0.6, 0.6]),  # all 6 better: p = 2 / 64
            "oar-g-shuffled": arm([0.6, 0.4, 0.6, 0.4, 0.6, 0.4]),
        }
    }
    text = study.confirmatory(summaries)
    # p = 0.03125 for oar-g − grpo, x 4 (two not run count as p = 1) = 0.125
    assert "- oar-g − grpo: +0.100 [+0.100, +0.100], sign-flip p = 0.031, Holm p = 0.125" in text
    assert "(does not reject H0 at 0.05), 6/6 seeds better" in text
    assert "- oar-p − grpo: not run" in text and "- oar-p − oar-p-shuffled: not run" in text
    assert "- oar-g − oar-g-shuffled: +0.100" in text
