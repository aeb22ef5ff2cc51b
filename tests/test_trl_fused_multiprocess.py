"""OARGRPOTrainer(oar_fused_loss=True) across two CPU processes (gloo), dapo with gradient
accumulation 2: training completes and both ranks end with the same parameters, which they
do only if the fused loss's gradients reach the data-parallel all-reduce. The rank script is
tests/trl_fused_two_processes.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_trl_multiprocess import _free_port

pytest.importorskip("trl", reason="trl is not installed (pip install '.[oar]')")


def test_two_processes_train_with_the_fused_loss_and_stay_in_sync(tmp_path):
    script = Path(__file__).with_name("trl_fused_two_processes.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(_free_port()), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["global_step"] for r in reports] == [2, 2]
    assert reports[0]["before"] == reports[1]["before"]
    assert reports[0]["after"] != reports[0]["before"]  # it trained
    assert reports[0]["after"] == pytest.approx(reports[1]["after"], rel=1e-12)
