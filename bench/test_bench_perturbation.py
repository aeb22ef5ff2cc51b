"""OAR-P: shared-prefix counterfactuals vs the paper-style loop (one row at a time, all R
masked copies as full sequences, full [R, T, V] logits), time and the peak memory each adds.

    pytest bench/test_bench_perturbation.py --benchmark-only
"""

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import oar_kernels as ok
from oar_kernels.testing import peak_bytes_in_subprocess, synchronized

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROMPT, ANSWER, VOCAB = 64, 4, 8192
SCORED = [64, 128, 256]
MASK_ID = 0


def bench_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=PROMPT + max(SCORED) + ANSWER,
    )
    return LlamaForCausalLM(config).to(DEVICE).eval()


def bench_row(scored):
    """One rollout: a prompt, `scored` reasoning tokens, an answer; mode `last`."""
    length = PROMPT + scored + ANSWER
    ids = torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(scored))
    attn = torch.ones(1, length, dtype=torch.bool)
    score = torch.zeros(1, length, dtype=torch.bool)
    score[0, PROMPT : PROMPT + scored] = True
    answer = torch.zeros(1, length, dtype=torch.bool)
    answer[0, -ANSWER:] = True
    return [t.to(DEVICE) for t in (ids, attn, score, answer)]


def paper_loop(model, ids, attn, score, answer):
    """All masked copies of the row in one batch, full logits, KL at the answer position."""
    with torch.no_grad():
        positions = score[0].nonzero().flatten()
        copies = ids.repeat(len(positions), 1)
        copies[torch.arange(len(positions)), positions] = MASK_ID
        at = int(answer[0].nonzero()[0]) - 1
        clean = torch.log_softmax(model(input_ids=ids).logits[0, at], -1)
        masked = torch.log_softmax(model(input_ids=copies).logits[:, at], -1)
        return (clean.exp() * (clean - masked)).sum(-1)


def shared_prefix(model, ids, attn, score, answer):
    return ok.perturbation_importance(
        model, ids, attn, score, answer, mode="last", mask_token_id=MASK_ID, max_batch_tokens=8192
    )


IMPLS = {"paper-loop": paper_loop, "shared-prefix": shared_prefix}


def peak_bytes(impl, scored):
    setup = f"""
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_bench_perturbation import IMPLS, bench_model, bench_row
model, batch = bench_model(), bench_row({scored})
"""
    return peak_bytes_in_subprocess(setup, f"IMPLS[{impl!r}](model, *batch)", DEVICE)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("scored", SCORED, ids=[f"R{r}" for r in SCORED])
def test_perturbation_importance(benchmark, impl, scored):
    model, batch = bench_model(), bench_row(scored)
    benchmark.group = f"OAR-P R={scored} T={PROMPT + scored + ANSWER}"
    benchmark.extra_info.update(impl=impl, baseline=impl == "paper-loop")
    if not benchmark.disabled:
        benchmark.extra_info["peak_mb"] = peak_bytes(impl, scored) / 2**20
    fn = synchronized(lambda: IMPLS[impl](model, *batch), DEVICE)
    fn()
    benchmark.pedantic(fn, rounds=3, warmup_rounds=0)
