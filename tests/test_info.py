import subprocess
import sys

import oar_kernels as ok
from oar_kernels import _info, cli
from tests.helpers import assert_python_passes


def test_info_names_every_op_and_backend(capsys):
    ok.info()
    text = capsys.readouterr().out
    for op in _info.backends():
        assert f"oar::{op}" in text
    assert "extension" in text and "torch" in text


def test_cli_info_exit_code():
    assert cli.main(["info"]) == 0
    done = subprocess.run([sys.executable, "-m", "oar_kernels", "info"], capture_output=True)
    assert done.returncode == 0 and b"bilevel_weights" in done.stdout


def test_cli_rejects_unknown_command():
    done = subprocess.run([sys.executable, "-m", "oar_kernels", "nope"], capture_output=True)
    assert done.returncode == 2 and b"invalid choice" in done.stderr


def test_without_extension_cpu_falls_back_to_torch_path():
    code = (
        "import torch, oar_kernels as ok\n"
        "from oar_kernels import _info\n"
        "assert _info.backends()['bilevel_weights']['cpu'] == 'torch (vectorized)'\n"
        "mask = torch.ones(1, 3, dtype=torch.bool)\n"
        "w = ok.bilevel_weights(torch.tensor([[0.0, 1.0, 3.0]]), mask)\n"
        "assert abs(w.mean().item() - 1) < 1e-6 and w[0, 0] < w[0, 2]\n"
    )
    assert_python_passes(code, OAR_KERNELS_NO_EXTENSION="1")


def test_reshape_demo_runs_and_preserves_mass(capsys):
    assert cli.main(["reshape-demo", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert "mean weight over the reasoning span: 1.0000" in text and "rollout 1" in text


def test_reshape_demo_rejects_bad_batch():
    done = subprocess.run(
        [sys.executable, "-m", "oar_kernels", "reshape-demo", "--batch", "0"], capture_output=True
    )
    assert done.returncode == 2 and b"--batch" in done.stderr
