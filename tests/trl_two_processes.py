"""One rank of tests/test_trl_multiprocess.py, run under torchrun with two CPU processes:
OARGRPOTrainer trains two steps; every generated batch's per-token
advantages equal the package's ops on this rank's own rows. Writes a JSON report per rank."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_trl_integration as single  # noqa: E402  (same tiny model, tokenizer and spans)

import oar_kernels as ok  # noqa: E402
from oar_kernels.integrations.trl import OARGRPOTrainer  # noqa: E402

out_dir = Path(sys.argv[1])


class Checked(OARGRPOTrainer):
    """Recomputes each batch's per-token advantages with the package's ops on the rows this
    rank holds, from TRL's own per-sequence advantages, and compares."""

    compared = 0
    rows: list[str] = []

    def _generate_and_score_completions(self, inputs):
        captured = {}
        base = single.trl.GRPOTrainer._generate_and_score_completions

        def keep(self_, inputs_):
            captured["out"] = base(self_, inputs_)
            captured["per_sequence"] = captured["out"]["advantages"].clone()
            return captured["out"]

        single.trl.GRPOTrainer._generate_and_score_completions = keep
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            single.trl.GRPOTrainer._generate_and_score_completions = base
        model = self.accelerator.unwrap_model(self.model)
        want = single._package_advantages(
            model, self.processing_class, output, captured["per_sequence"]
        )
        torch.testing.assert_close(output["advantages"], want, rtol=1e-5, atol=1e-6)
        Checked.compared += want.shape[0]
        Checked.rows += [str(single._row_key(output, r)) for r in range(want.shape[0])]
        return output


def main():
    ok.spans.completion_spans = single._last_tokens_as_answer
    parts = single.make_trainer_parts(out_dir)
    trainer = Checked(**parts, oar_method="gradient", oar_mode="answer_joint")
    result = trainer.train()
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "backend": str(torch.distributed.get_backend())
        if torch.distributed.is_initialized()
        else None,
        "global_step": result.global_step,
        "loss": result.training_loss,
        "rows_compared": Checked.compared,
        "rows": Checked.rows,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    # Tear the gloo group down before the interpreter exits: left to exit, its worker
    # threads can be destroyed while still joinable, which aborts the process
    # ("terminate called without an active exception") after training succeeded.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
    # The report is written: leave without the interpreter's teardown, where a library's
    # C++ thread still joinable at exit can abort the process (CI saw it once, after
    # both ranks had trained and reported).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
