"""OARGRPOTrainer across processes: two CPU processes (gloo) train two steps, and on each
rank the per-token advantages equal the package's ops on that rank's
rows (OAR is row-local: no rank needs another's rows). The rank script is
tests/trl_two_processes.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (pip install '.[oar]')")
pytest.importorskip("accelerate", reason="accelerate is not installed (comes with trl)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_and_match_the_package_per_rank(tmp_path):
    script = Path(__file__).with_name("trl_two_processes.py")
    # torchrun, not `accelerate launch --cpu`: the latter runs several CPU processes only
    # through mpirun, and one process without MPI. TRL's accelerate state reads torchrun's
    # RANK / WORLD_SIZE and picks gloo on CPU, as it does for `accelerate launch` on GPUs.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(_free_port()), str(script), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["rank"] == rank and report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["global_step"] == 2 and report["rows_compared"] >= 8
    # Each rank scored its own rows; both report the same (all-reduced) training loss.
    assert not set(reports[0]["rows"]) & set(reports[1]["rows"])
    assert reports[0]["loss"] == pytest.approx(reports[1]["loss"])
