"""OAR-P micro-batching: counterfactuals of many rows per decoder call, a memory budget,
an op count that does not grow with the rows in a micro-batch, no per-micro-batch host reads."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oar_kernels as ok
from oar_kernels.importance import perturbation
from tests.helpers import (
    assert_verbose_allclose,
    check_bad_call,
    ragged_rollouts,
    tiny_causal_lm,
)
from tests.test_oar_g_heads import FAMILIES, family_model
from tests.test_perturbation_importance import MASK_ID, naive_importance

# Ops that read a value, or a shape that depends on values, back to the host (a GPU sync).
HOST_READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class _Dispatched(TorchDispatchMode):
    """Counts the aten ops dispatched, and those that read a value back to the host."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func in HOST_READS
        return func(*args, **(kwargs or {}))


@pytest.fixture
def any_padding(monkeypatch):
    """Micro-batches bounded by the budgets alone (no padding limit): their count is then
    the test's to choose."""
    monkeypatch.setattr(perturbation, "PADDING_SLACK", {"cpu": float("inf")})


def _batch(rows, length=16, scored=4, seed=0):
    """Equal rows: a prompt, `scored` reasoning tokens, a two-token answer."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (rows, length), generator=gen)
    attention = torch.ones(rows, length, dtype=torch.bool)
    score = torch.zeros_like(attention)
    score[:, length - 2 - scored : length - 2] = True
    answer = torch.zeros_like(attention)
    answer[:, -2:] = True
    return ids, attention, score, answer


def _dispatched(model, batch, **kwargs):
    with _Dispatched() as counted:
        _, stats = ok.perturbation_importance(
            model, *batch, mask_token_id=MASK_ID, return_stats=True, **kwargs
        )
    return counted, stats


@pytest.mark.parametrize("mode", ["last", "answer_mean", "answer_joint"])
def test_ops_do_not_grow_with_the_rows_in_a_micro_batch(mode, any_padding):
    model = tiny_causal_lm("qwen2")
    one, _ = _dispatched(model, _batch(1), mode=mode)
    eight, stats = _dispatched(model, _batch(8), mode=mode)
    assert stats.micro_batches == 1  # 32 counterfactuals of 8 rows in one decoder call
    assert eight.ops == one.ops


def test_ops_per_micro_batch_are_a_constant(any_padding):
    model = tiny_causal_lm("llama")
    counts = {}
    for rows in (1, 8):
        for per_batch in (4, 2, 1):  # counterfactuals per micro-batch, via the token budget
            counted, stats = _dispatched(model, _batch(rows), max_batch_tokens=per_batch * 18)
            counts[rows, stats.micro_batches] = counted.ops
    # (A micro-batch spanning the whole plan skips a few no-op slices: compare from 2 on.)
    per_micro_batch = (counts[1, 4] - counts[1, 2]) // 2
    assert per_micro_batch < 400  # one decoder call and its gathers, for 2 layers
    assert counts[1, 4] - counts[1, 2] == 2 * per_micro_batch
    assert counts[8, 16] - counts[8, 8] == 8 * per_micro_batch
    assert counts[8, 32] - counts[8, 16] == 16 * per_micro_batch
    assert counts[8, 8] - counts[1, 2] == 6 * per_micro_batch  # nothing else sees B


@pytest.mark.parametrize("mode", ["last", "answer_joint"])
def test_host_reads_do_not_grow_with_the_micro_batches(mode, any_padding):
    model = tiny_causal_lm("llama")
    batch = _batch(3, scored=6)
    whole, stats = _dispatched(model, batch, mode=mode)
    # A budget that fits the clean forward of the 3 rows (16 columns at most) in one call: its
    # mask builder reads the mask once per call.
    budget = 3 * perturbation.counterfactual_bytes(perturbation.model_dims(model), 0, 16, 2)
    split, split_stats = _dispatched(model, batch, mode=mode, max_batch_bytes=budget)
    alone, alone_stats = _dispatched(model, batch, mode=mode, max_batch_tokens=1)
    assert (stats.micro_batches, alone_stats.micro_batches) == (1, 18)
    assert split_stats.micro_batches > 1
    assert split.host_reads == whole.host_reads == alone.host_reads
    assert whole.host_reads <= 4  # input checks, the clean forward's mask, the finite check


def test_every_counterfactual_alone_gives_the_one_batch_scores():
    model = tiny_causal_lm("qwen2").double()
    batch = _batch(3, scored=6, seed=4)
    batch[1][0, :3] = False  # a padded row among full ones
    batch[0][0, :3] = 0
    whole = ok.perturbation_importance(model, *batch, mode="answer_mean", mask_token_id=MASK_ID)
    alone, stats = ok.perturbation_importance(
        model,
        *batch,
        mode="answer_mean",
        mask_token_id=MASK_ID,
        max_batch_bytes=1,
        return_stats=True,
    )
    assert stats.micro_batches == int(batch[2].sum())
    assert_verbose_allclose(alone, whole, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["answer_mean", "answer_joint"])
def test_tokens_scored_after_the_answer_score_zero(mode):
    model = tiny_causal_lm("llama").double()
    ids, attention, score, answer = _batch(2, length=14, seed=5)
    score[:], answer[:] = False, False
    score[:, 3:7] = True
    answer[:, 7:9] = True  # the answer in the middle; tokens after it are scored too
    score[:, 10:13] = True
    got, stats = ok.perturbation_importance(
        model, ids, attention, score, answer, mode=mode, mask_token_id=MASK_ID, return_stats=True
    )
    assert torch.all(got[:, 10:] == 0)
    for r in range(2):
        want = naive_importance(model, ids[r], score[r], answer[r], mode)
        assert_verbose_allclose(got[r], want, rtol=1e-6, atol=1e-12, name=f"row {r}")
    # Per row: the clean columns 0..7 (7 predicts the last answer token), then suffixes
    # s..7 for s = 3..6; the tokens after the answer are never computed.
    assert stats.token_forwards == 2 * (8 + 5 + 4 + 3 + 2)


def test_sliding_window_model_matches_naive_full_forwards():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    )
    model = Qwen2ForCausalLM(config).double().eval()
    assert "sliding_attention" in model.config.layer_types
    ids, attention, score, answer = _batch(2, length=16, scored=8, seed=6)
    got = ok.perturbation_importance(
        model, ids, attention, score, answer, mode="answer_mean", mask_token_id=MASK_ID
    )
    for r in range(2):
        want = naive_importance(model, ids[r], score[r], answer[r], "answer_mean")
        assert_verbose_allclose(got[r], want, rtol=1e-6, atol=1e-12, name=f"row {r}")


def test_micro_batches_follow_the_memory_budget(any_padding):
    model = tiny_causal_lm("llama")
    batch = _batch(4, scored=6)
    dims = perturbation.model_dims(model)
    largest = perturbation.counterfactual_bytes(dims, 16, 16, 2)
    counts = {}
    for per_batch in (1, 3, 24):
        _, stats = ok.perturbation_importance(
            model,
            *batch,
            mask_token_id=MASK_ID,
            max_batch_bytes=per_batch * largest,
            return_stats=True,
        )
        counts[per_batch] = stats.micro_batches
    assert counts[1] <= 24 and counts[3] <= 8 and counts[24] == 1
    assert counts[1] > counts[3] > counts[24]


def test_model_dims_come_from_the_config():
    model = tiny_causal_lm("qwen2")
    dims = perturbation.model_dims(model)
    config = model.config
    assert dims == perturbation.ModelDims(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        vocab=config.vocab_size,
        itemsize=4,
    )
    small = perturbation.counterfactual_bytes(dims, 8, 4, 1)
    assert small < perturbation.counterfactual_bytes(dims, 16, 4, 1)
    assert small < perturbation.counterfactual_bytes(dims, 8, 8, 1)
    assert small < perturbation.counterfactual_bytes(dims, 8, 4, 2)


def _bad_budgets():
    model = tiny_causal_lm("llama")
    batch = _batch(1)

    def call(**kwargs):
        return ok.perturbation_importance(model, *batch, mask_token_id=MASK_ID, **kwargs)

    return [
        ("bytes-0", lambda: call(max_batch_bytes=0), ValueError, "max_batch_bytes"),
        ("bytes-float", lambda: call(max_batch_bytes=1e9), TypeError, "max_batch_bytes"),
        ("bytes-bool", lambda: call(max_batch_bytes=True), TypeError, "max_batch_bytes"),
        ("bytes-none", lambda: call(max_batch_bytes=None), TypeError, "max_batch_bytes"),
        ("tokens-0", lambda: call(max_batch_tokens=0), ValueError, "max_batch_tokens"),
    ]


@pytest.mark.parametrize("case", _bad_budgets(), ids=lambda c: c[0])
def test_bad_budgets_raise_clear_errors(case):
    check_bad_call(case)


@pytest.mark.parametrize("mode", ["last", "answer_mean", "answer_joint"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_scaled_and_soft_capped_heads_match_naive_full_forwards(family, mode):
    # Gemma-2 (soft cap, sliding windows), Cohere (logit_scale), Granite (logits_scaling):
    # the naive reference reads the model's own forward logits.
    model = family_model(family)
    ids, attn, score, answer, _, per_row = ragged_rollouts(seed=3, left_pad=False)
    got = ok.perturbation_importance(
        model, ids, attn, score, answer, mode=mode, mask_token_id=MASK_ID, max_batch_tokens=40
    )
    for r, (row_ids, s, a, _, cols) in enumerate(per_row):
        want = naive_importance(model, row_ids, s, a, mode)
        assert_verbose_allclose(got[r, cols], want, rtol=1e-6, atol=1e-12, name=f"row {r}")


def test_cpu_micro_batches_pad_at_most_an_eighth():
    # Suffixes of 2 .. 40 tokens: one micro-batch would pad them to 40 (~1.9x the real ones).
    model = tiny_causal_lm("llama")
    batch = _batch(2, length=48, scored=39)
    _, stats = ok.perturbation_importance(model, *batch, mask_token_id=MASK_ID, return_stats=True)
    assert stats.micro_batches > 1
    assert stats.padded_token_forwards <= (1 + perturbation.PADDING_SLACK["cpu"]) * (
        stats.token_forwards
    )


@pytest.mark.parametrize("variant", ["stride", "segments"])
def test_variants_keep_ops_and_host_reads_flat_in_the_rows(variant, any_padding):
    from oar_kernels.importance.variants import window_segments

    def extra(batch):
        if variant == "stride":
            return {"stride": 2}
        return {"segments": window_segments(batch[2], 2)}

    model = tiny_causal_lm("qwen2")
    one_row, eight_rows = _batch(1), _batch(8)
    one, _ = _dispatched(model, one_row, **extra(one_row))
    eight, stats = _dispatched(model, eight_rows, **extra(eight_rows))
    assert stats.micro_batches == 1  # 16 counterfactuals of 8 rows in one decoder call
    assert eight.ops == one.ops
    assert eight.host_reads == one.host_reads <= 4
