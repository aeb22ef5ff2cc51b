"""The reference GRPO loop under trouble: interrupts at any point of a step, two runs in one
out_dir, torn metrics lines, corrupt caches and checkpoints, bad config values and out_dirs.

The runs here use a tiny model with no warm-start training (0 steps, so the cache costs
nothing) and a stand-in reward: an untrained model is never right, and a reward that splits
each group by a property of the text gives nonzero advantages and real updates to resume.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

from oar_kernels import cli
from oar_kernels.grpo import loop, viz
from oar_kernels.grpo import model as policy
from oar_kernels.grpo.config import ConfigError, TrainConfig
from oar_kernels.grpo.loop import CHECKPOINT, METRICS, Trainer, read_jsonl, train
from oar_kernels.grpo.rollout import vllm_unavailable
from oar_kernels.grpo.task import build_tokenizer

TIMINGS = {"rollout_s", "advantage_s", "update_s"}


def split_reward(text: str, answer: int) -> float:
    """Half of random completions score: the parity of their distinct characters."""
    return float(len(set(text)) % 2)


@pytest.fixture(scope="module", autouse=True)
def tiny_world(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OAR_KERNELS_CACHE", str(tmp_path_factory.mktemp("tiny-cache")))
        patch.setattr(loop, "reward", split_reward)
        yield


def tiny(out_dir, **overrides) -> TrainConfig:
    """Three seconds-long GRPO steps on the CPU, evaluated at steps 0, 2 and 3."""
    values = dict(
        method="grpo",
        steps=3,
        eval_every=2,
        checkpoint_every=10,
        prompts_per_step=2,
        num_generations=4,
        max_new_tokens=12,
        eval_size=4,
        eval_samples=2,
        hidden_size=32,
        num_layers=1,
        warm_start_max_steps=0,
        device="cpu",
        progress=False,
        out_dir=str(out_dir),
    )
    return TrainConfig(**{**values, **overrides})


def metrics_of(out_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_jsonl(out_dir / METRICS)]


def weights_of(out_dir) -> dict:
    return torch.load(out_dir / CHECKPOINT, weights_only=True)["model"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its metrics and final weights."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny(out))
    records = metrics_of(out)
    assert any(r.get("grad_norm", 0) > 0 for r in records), "nothing was learned: vacuous"
    return records, weights_of(out)


def assert_same_run(out_dir, straight) -> None:
    records, weights = straight
    assert [r["step"] for r in metrics_of(out_dir)] == [0, 1, 2, 3]
    assert metrics_of(out_dir) == records
    resumed = weights_of(out_dir)
    assert all(torch.equal(resumed[name], tensor) for name, tensor in weights.items())


def interrupt_call(monkeypatch, owner, name, call: int, *, after: bool = False) -> None:
    """Make the `call`-th call of owner.name raise KeyboardInterrupt, before its work or,
    with `after`, once it is done."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == call and not after:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if len(calls) == call:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupted)


# Where in step 2 the interrupt lands: (object, method, which call, after its work).
INTERRUPTS = {
    # generate: step 0's evaluation (greedy, sampled), step 1's rollouts, step 2's
    "rollouts": (lambda trainer: trainer.rollouts, "generate", 4, False),
    # optimizer.step: two per step (num_iterations); step 2's first update has been applied
    "update": (lambda trainer: trainer.optimizer, "step", 4, False),
    "evaluation": (lambda trainer: trainer, "evaluate", 2, False),
    # the metrics lines of steps 0, 1 and 2: the third one is written, then the interrupt
    "logging": (lambda trainer: loop, "_append_line", 3, True),
}


@pytest.mark.parametrize("where", INTERRUPTS)
def test_an_interrupt_anywhere_in_a_step_resumes_to_the_uninterrupted_run(
    tmp_path, monkeypatch, straight, where
):
    owner_of, name, call, after = INTERRUPTS[where]
    trainer = Trainer(tiny(tmp_path))
    interrupt_call(monkeypatch, owner_of(trainer), name, call, after=after)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1
    train(tiny(tmp_path), resume=True)
    assert_same_run(tmp_path, straight)


def test_a_second_trainer_in_the_same_out_dir_is_refused(tmp_path, straight):
    first = Trainer(tiny(tmp_path))
    with pytest.raises(ConfigError, match=rf"in use by another training \(pid {os.getpid()} "):
        Trainer(tiny(tmp_path), overwrite=True)
    first.run()
    assert_same_run(tmp_path, straight)
    Trainer(tiny(tmp_path), resume=True).close()  # the finished run let go of out_dir


HOLDER = """
import json, sys, time
from oar_kernels.grpo.config import TrainConfig
from oar_kernels.grpo.loop import Trainer
trainer = Trainer(TrainConfig(**json.loads(sys.argv[1])))
print("locked", flush=True)
time.sleep(600)
"""


def test_the_lock_names_the_holding_process_and_dies_with_it(tmp_path, capsys):
    config = tiny(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(config.to_dict())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["train", "--out-dir", str(tmp_path), "--no-progress"]) == 2
        assert f"in use by another training (pid {holder.pid} on " in capsys.readouterr().err
    finally:
        holder.kill()  # a crash: no cleanup runs, and the lock goes with the process
        holder.wait()
    Trainer(config, overwrite=True).close()


def test_resume_drops_a_torn_metrics_line(tmp_path, straight):
    train(tiny(tmp_path, steps=2))  # step 2 is evaluated, as in the three-step run
    with open(tmp_path / METRICS, "a") as file:
        file.write('{"step": 3, "reward": 0.')  # a crash while writing step 3
    train(tiny(tmp_path), resume=True)
    assert_same_run(tmp_path, straight)


def test_viz_skips_a_torn_line_with_a_warning(tmp_path):
    (tmp_path / "config.yaml").write_text("method: grpo\n")
    (tmp_path / METRICS).write_text(
        '{"step": 0, "eval_accuracy": 0.5, "eval_greedy": 0.5}\n'
        '{"step": 1, "reward": 1.0}\n'
        '{"step": 2, "rew'
    )
    with pytest.warns(UserWarning, match="line 3: skipped a line that is not a JSON record"):
        run = viz.load_run(tmp_path)
    assert [r["step"] for r in run["metrics"]] == [0, 1]
    with pytest.warns(UserWarning, match="line 3"):
        viz.render([tmp_path], tmp_path / "pictures")


def corrupt(path, how: str) -> None:
    whole = path.read_bytes()
    damaged = {"garbage": os.urandom(len(whole)), "truncated": whole[: len(whole) // 2]}
    path.write_bytes(damaged.get(how, b""))


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_a_corrupt_warm_start_cache_is_rebuilt_with_a_warning(tmp_path, how):
    tokenizer = build_tokenizer()
    spec, warm = policy.ModelSpec(hidden_size=16, num_layers=1), policy.WarmStart(max_steps=2)
    first = policy.warm_started_model(tokenizer, spec, warm, cache=tmp_path, progress=False)
    (entry,) = tmp_path.iterdir()
    corrupt(entry, how)
    with pytest.warns(UserWarning, match="warm-start cache .* cannot be loaded"):
        rebuilt = policy.warm_started_model(tokenizer, spec, warm, cache=tmp_path, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry loads cleanly
        again = policy.warm_started_model(tokenizer, spec, warm, cache=tmp_path, progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.fixture
def no_warm_start(monkeypatch):
    """Fail the test if the warm start runs: what is refused must be refused before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the warm start ran before the error")

    monkeypatch.setattr(policy, "warm_started_model", refuse)


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    """A run of one step: its checkpoint and metrics."""
    out = tmp_path_factory.mktemp("one-step")
    train(tiny(out, steps=1))
    return out


@pytest.mark.parametrize(
    "how, match",
    [
        ("garbage", "is not a readable checkpoint"),
        ("truncated", "is not a readable checkpoint"),
        ("empty", r"is not a readable checkpoint \(it is empty\)"),
        ("missing keys", "lacks or garbles optimizer, config"),
        ("foreign objects", "is not a readable checkpoint"),
    ],
)
def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, one_step, no_warm_start, how, match):
    path = tmp_path / CHECKPOINT
    shutil.copy(one_step / CHECKPOINT, path)
    if how == "missing keys":
        torch.save({"step": 1, "model": {}}, path)
    elif how == "foreign objects":  # loads only unsafely: torch would advise weights_only=False
        torch.save({"step": 1, "config": argparse.Namespace()}, path)
    else:
        corrupt(path, how)
    with pytest.raises(ConfigError, match=match) as error:
        Trainer(tiny(tmp_path), resume=True)
    assert "weights_only" not in "".join(traceback.format_exception(error.value))


def test_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error(tmp_path, one_step):
    shutil.copy(one_step / METRICS, tmp_path / METRICS)
    path = tmp_path / CHECKPOINT
    state = torch.load(one_step / CHECKPOINT, weights_only=True)
    del state["model"]["model.norm.weight"]
    torch.save(state, path)
    with pytest.raises(ConfigError, match="does not fit this model"):
        Trainer(tiny(tmp_path), resume=True)


def test_cli_reports_a_corrupt_checkpoint_with_exit_code_2(tmp_path, capfd, no_warm_start):
    torch.save({"step": 1, "config": argparse.Namespace()}, tmp_path / CHECKPOINT)
    assert cli.main(["train", "--resume", "--out-dir", str(tmp_path), "--no-progress"]) == 2
    err = capfd.readouterr().err
    assert "is not a readable checkpoint" in err and "weights_only" not in err


# One bad value per field (several for some), each refused with the field's name.
BAD_VALUES = [
    ("method", "ppo"),
    ("seed", -1),
    ("seed", 2**32),
    ("steps", 0),
    ("steps", True),
    ("out_dir", ""),
    ("prompts_per_step", 0),
    ("num_generations", 1),
    ("temperature", 1e-7),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("max_new_tokens", 0),
    ("rollout_backend", "sglang"),
    ("scale_rewards", "std"),
    ("loss_type", "ppo"),
    ("num_iterations", 0),
    ("warmup_updates", -1),
    ("lr", 0.0),
    ("lr", math.inf),
    ("lr", "1e-4"),
    ("epsilon_low", 1.5),
    ("epsilon_low", -0.1),
    ("epsilon_high", -0.1),
    ("epsilon_high", math.inf),
    ("kl_beta", math.inf),
    ("kl_beta", -1.0),
    ("max_grad_norm", 0.0),
    ("max_grad_norm", math.nan),
    ("oar_mode", "first"),
    ("reshape_tau", 1.5),
    ("reshape_beta", -1.0),
    ("reshape_beta", 1e7),
    ("reshape_floor", -0.1),
    ("task", "subtraction"),
    ("fillers", -1),
    ("digits", 0),
    ("hidden_size", 4),
    ("hidden_size", 12),
    ("num_layers", 0),
    ("warm_start_accuracy", 1.5),
    ("warm_start_max_steps", -1),
    ("eval_size", 0),
    ("eval_samples", 0),
    ("eval_every", 0),
    ("checkpoint_every", 0),
    ("heatmap_samples", -1),
    ("device", "tpu"),
    ("progress", 1),
]


def test_every_config_field_has_a_bad_value_in_the_table():
    assert {name for name, _ in BAD_VALUES} == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_config_refuses_each_bad_value_naming_its_field(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} "):
        TrainConfig(**{name: value})


def test_config_refuses_a_vllm_run_on_the_cpu():
    with pytest.raises(ConfigError, match="rollout_backend='vllm' needs device 'cuda'"):
        TrainConfig(rollout_backend="vllm", device="cpu")


@pytest.mark.skipif(vllm_unavailable() is None, reason="vLLM can run here")
def test_a_vllm_run_where_vllm_cannot_run_is_refused_before_the_warm_start(tmp_path, no_warm_start):
    with pytest.raises(ConfigError, match="rollout_backend='vllm' needs"):
        Trainer(tiny(tmp_path, rollout_backend="vllm", device="auto"))


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--epsilon-low", "1.5", "epsilon_low must be in [0, 1]"),
        ("--temperature", "1e-7", "temperature must be >= 0.01"),
        ("--eval-samples", "0", "eval_samples must be >= 1"),
        ("--kl-beta", "inf", "kl_beta must be a finite number"),
    ],
)
def test_cli_refuses_bad_values_before_the_warm_start(
    tmp_path, capsys, no_warm_start, flag, value, message
):
    out = tmp_path / "run"
    assert cli.main(["train", flag, value, "--out-dir", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def read_only_dir(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    out = tmp_path / "read-only"
    out.mkdir(mode=0o555)
    return out


def a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


@pytest.mark.parametrize(
    "make, match",
    [
        (a_file, "is a file, not a directory"),
        (lambda tmp_path: a_file(tmp_path) / "run", "is not a writable directory: Not a directory"),
        (read_only_dir, "is not a writable directory: Permission denied"),
    ],
    ids=["a file", "under a file", "read-only"],
)
def test_an_unwritable_out_dir_is_refused_before_the_warm_start(
    tmp_path, capsys, no_warm_start, make, match
):
    out = make(tmp_path)
    with pytest.raises(ConfigError, match=match):
        Trainer(tiny(out))
    assert cli.main(["train", "--out-dir", str(out), "--no-progress"]) == 2
    assert match in capsys.readouterr().err


def test_a_failed_start_releases_the_lock(tmp_path):
    train(tiny(tmp_path, steps=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(tiny(tmp_path))
    Trainer(tiny(tmp_path), resume=True).close()


def test_the_learning_rate_warms_up_linearly_over_warmup_updates():
    lrs = [loop._warmed_lr(tiny("x", lr=1e-3, warmup_updates=4), u) for u in range(6)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)
    assert loop._warmed_lr(tiny("x", lr=1e-3, warmup_updates=0), 0) == 1e-3


def test_the_first_update_starts_at_ratio_one_from_the_policys_own_logprobs(tmp_path, monkeypatch):
    """Step 1's first forward is the rollout policy's: its logprobs are the model's own
    (checked against a plain forward of the whole model), grpo_loss gets no old logprobs (so
    its ratio is exactly 1), and the second update's old logprobs are exactly those."""
    trainer = Trainer(tiny(tmp_path, steps=1, num_iterations=2))
    calls = []
    real_loss = loop.grpo_loss

    def recording(hidden, weight, targets, advantages, mask, **kwargs):
        result = real_loss(hidden, weight, targets, advantages, mask, **kwargs)
        plain = None
        if not calls:  # before any update: the model as it sampled the rollouts
            with torch.no_grad():
                logits = trainer.model(input_ids=batch["input_ids"], **forward).logits
            plain = logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        calls.append((kwargs["old_logprobs"], result.logprobs.detach(), mask.bool(), plain))
        return result

    real_batch = trainer._batch

    def keep_batch(rollouts):
        batch.update(real_batch(rollouts))
        attention = batch["attention_mask"].long()
        forward.update(attention_mask=attention, position_ids=loop.position_ids_from(attention))
        return batch

    batch, forward = {}, {}
    monkeypatch.setattr(loop, "grpo_loss", recording)
    monkeypatch.setattr(trainer, "_batch", keep_batch)
    trainer.run()
    (first_old, first, mask, plain), (second_old, second, _, _) = calls
    assert first_old is None
    assert torch.equal(second_old, first)
    torch.testing.assert_close(first[mask], plain[mask], rtol=0, atol=1e-5)
    assert not torch.equal(second[mask], first[mask]), "the first update changed nothing"


def test_the_warmup_keeps_step_ones_kl_to_old_small(tmp_path):
    """Without a warmup AdamW's first update moves every weight by about lr, so the second
    update of step 1 starts far from the rollout policy; with it, as close as later steps."""
    kl = {}
    for warmup in (0, 10):
        out = tmp_path / f"warmup-{warmup}"
        train(tiny(out, steps=2, lr=1e-3, warmup_updates=warmup))
        kl[warmup] = [r["kl_to_old"] for r in read_jsonl(out / METRICS)[1:]]
    assert kl[0][0] > 20 * kl[10][0], kl
    assert kl[10][0] < 0.01, kl


def test_resume_alone_continues_a_run_with_its_saved_config(tmp_path, capsys):
    """`train --resume --out-dir D` reads D's config.yaml: the tiny run (every size and
    schedule off its default) goes on with only the flags that change something; a flag that
    would make another run is refused, naming its field."""
    out = tmp_path / "run"
    train(tiny(out, steps=1, lr=1e-3, warmup_updates=3))
    refused = ["train", "--resume", "--out-dir", str(out), "--steps", "2", "--lr", "5e-4"]
    assert cli.main(refused) == 2
    assert "the checkpoint was trained with other ['lr']" in capsys.readouterr().err
    assert cli.main(["train", "--resume", "--out-dir", str(out), "--steps", "2"]) == 0
    assert "after 2 steps" in capsys.readouterr().out
    assert [r["step"] for r in read_jsonl(out / METRICS)] == [0, 1, 2]
    assert TrainConfig.of_run(out) == tiny(out, steps=2, lr=1e-3, warmup_updates=3)


def test_a_run_saved_before_warmup_updates_existed_resumes_without_a_warmup(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=1, warmup_updates=0))
    saved = torch.load(out / CHECKPOINT, weights_only=True)
    del saved["config"]["warmup_updates"]
    torch.save(saved, out / CHECKPOINT)
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("warmup_updates: 0\n", ""))
    config = TrainConfig.of_run(out, steps=2)
    assert config.warmup_updates == 0
    assert train(config, resume=True).steps == 2
