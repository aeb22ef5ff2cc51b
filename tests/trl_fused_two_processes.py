"""One rank of tests/test_trl_fused_multiprocess.py, run under torchrun with two CPU
processes: OARGRPOTrainer(oar_fused_loss=True), dapo with gradient accumulation 2, trains two
steps. Writes its parameters' sums before and after (JSON per rank): data-parallel training
keeps every rank's copy equal only if the fused loss's gradients are all-reduced."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_trl_integration as single  # noqa: E402  (same tiny model, tokenizer and spans)

import oar_kernels as ok  # noqa: E402
from oar_kernels.integrations.trl import OARGRPOTrainer  # noqa: E402


def _parameter_sum(trainer) -> float:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return sum(p.detach().double().abs().sum().item() for p in model.parameters())


def main(out_dir: Path) -> None:
    ok.spans.completion_spans = single._last_tokens_as_answer
    parts = single.make_trainer_parts(out_dir, loss_type="dapo", gradient_accumulation_steps=2)
    trainer = OARGRPOTrainer(**parts, oar_fused_loss=True)
    before = _parameter_sum(trainer)
    result = trainer.train()
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "global_step": result.global_step,
        "before": before,
        "after": _parameter_sum(trainer),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():  # as in trl_two_processes.py: no abort at exit
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # The report is written: leave without the interpreter's teardown, where a library's
    # C++ thread still joinable at exit can abort the process (CI saw it once, after
    # both ranks had trained and reported).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
