"""The `oar-kernels` command's surface: help texts, usage errors, YAML keys, the Ctrl-C hints,
and that `--help` does not import torch. Nothing here trains."""

import dataclasses
import os
import subprocess
import sys

import pytest

from oar_kernels import cli
from oar_kernels.grpo.config import ConfigError, TrainConfig, choices_of


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrapped


def test_top_level_help_does_not_import_torch():
    code = (
        "import sys\nfrom oar_kernels import cli\ntry:\n    cli.main(['--help'])\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"


def test_the_ops_register_on_first_use_of_a_public_name():
    # `import oar_kernels` is light (the line above); the README tells callers of torch.ops.oar
    # to touch one public name first, which must register every op family.
    code = (
        "import torch, oar_kernels\n"
        "assert not hasattr(torch.ops.oar, 'bilevel_weights')\n"
        "from oar_kernels import info\n"
        "for op in ('bilevel_weights', 'reshape_advantages', 'token_logprobs', 'grpo_loss',"
        " 'saliency'):\n"
        "    getattr(torch.ops.oar, op)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_config_field_has_help_text():
    for knob in dataclasses.fields(TrainConfig):
        assert len(knob.metadata.get("help", "")) > 10, knob.name


def test_train_help_describes_every_flag_with_its_choices_and_default(capsys):
    text = help_of(["train"], capsys)
    for knob in dataclasses.fields(TrainConfig):
        flag = "--" + knob.name.replace("_", "-")
        described = " ".join(knob.metadata["help"].split())
        assert f"{described} (" in text, flag
        assert f"default {knob.default})" in text, flag
        if choices_of(knob.name):
            assert f"{flag} {{{','.join(choices_of(knob.name))}}}" in text
    assert "--progress, --no-progress" in text
    assert "(>= 0; default 10)" in text  # warmup_updates' range
    assert "with the config it was started with" in text  # --resume


def test_demo_help_describes_seeds_and_steps(capsys):
    text = help_of(["demo"], capsys)
    assert "--seeds SEEDS seeds 0 to N-1 of every arm" in text
    assert "--fillers FILLERS filler letters before each step" in text
    assert "--steps STEPS optimizer steps of every run (default 30)" in text


@pytest.mark.parametrize("command", ["train", "demo", "study", "viz", "info"])
def test_an_unknown_flag_prints_the_commands_usage(command, capsys):
    argv = [command, "--bogus", "1"] + (["run"] if command == "viz" else [])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: oar-kernels {command} ")
    assert f"oar-kernels {command}: error: unrecognized arguments: --bogus" in err


def test_yaml_keys_may_be_flag_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("out-dir: runs/x\nwarmup-updates: 3\nlr: 1e-4\nkl_beta: 0.5\n")
    config = TrainConfig.from_yaml(path)
    assert (config.out_dir, config.warmup_updates, config.lr, config.kl_beta) == (
        "runs/x",
        3,
        1e-4,
        0.5,
    )
    path.write_text("out-dir: a\nout_dir: b\n")
    with pytest.raises(ConfigError, match="sets out_dir twice"):
        TrainConfig.from_yaml(path)
    path.write_text("learning-rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key.*learning_rate"):
        TrainConfig.from_yaml(path)


def test_cli_reads_hyphenated_yaml_keys(tmp_path, capsys, monkeypatch):
    from oar_kernels.grpo import loop

    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train", fake_train)
    path = tmp_path / "run.yaml"
    path.write_text(f"out-dir: {tmp_path / 'x'}\nwarmup-updates: 0\n")
    assert cli.main(["train", "--config", str(path), "--lr", "2e-4"]) == 130
    assert seen["config"].out_dir == str(tmp_path / "x")
    assert (seen["config"].warmup_updates, seen["config"].lr) == (0, 2e-4)
    assert "interrupted before a step finished: nothing to resume" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "checkpoint.pt").write_bytes(b"")
    assert cli.main(["train", "--config", str(path)]) == 130
    err = capsys.readouterr().err
    assert f"continue with `oar-kernels train --resume --out-dir {tmp_path / 'x'}`" in err


def test_the_demo_interrupted_does_not_offer_a_resume_it_lacks(capsys, monkeypatch):
    from oar_kernels.grpo import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert cli.main(["demo", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "`oar-kernels demo` starts every run afresh" in err
    assert "oar-kernels train --resume --out-dir" in err


def test_demo_takes_methods_as_arms_and_picks_its_workers(monkeypatch):
    import torch

    from oar_kernels.grpo import demo

    seen = {}
    monkeypatch.setattr(demo, "run", lambda out, **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "--methods", "grpo,oar-p", "--fillers", "0"]) == 0
    assert seen["arms"] == ("grpo", "oar-p") and seen["fillers"] == 0
    assert seen["workers"] is None  # demo.default_workers decides
    with pytest.raises(SystemExit):
        cli.main(["demo", "--workers", "0"])
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.default_workers(9) == min(9, cores) and demo.default_workers(1) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert demo.default_workers(9) == 1  # runs share one GPU: one at a time
