"""OAR-G on models whose logits are not the lm head's output (issue 13 item 5): Gemma-2's
soft cap z = cap * tanh(l / cap), Cohere's z = scale * l and Granite's z = l / scaling, read
from the config. Scores, the outcome logprob and the old logprobs must equal those of the
model's own forward logits. Tiny random models built here (no downloads)."""

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

import oar_kernels as ok
from oar_kernels.importance import causal_lm, gradient
from oar_kernels.importance.batch import MODES
from oar_kernels.logprobs import CHUNK_BYTES
from tests.helpers import TINY_VOCAB, TINY_WIDTH, assert_verbose_allclose, ragged_rollouts
from tests.test_gradient_importance import reference_row

COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=TINY_WIDTH,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Random-init logits are about 0.3: a cap of 0.2 and a scale of 8 change them a lot.
FAMILIES = {
    "gemma2-softcap": lambda: Gemma2ForCausalLM(
        Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=0.2, sliding_window=6)
    ),
    "cohere-scale": lambda: CohereForCausalLM(CohereConfig(**COMMON, logit_scale=8.0)),
    "granite-scaling": lambda: GraniteForCausalLM(GraniteConfig(**COMMON, logits_scaling=0.125)),
}


# Right padding throughout: Gemma-2's eager attention takes its softmax in float32, where a
# float64 model's mask value becomes -inf and left padding's fully masked rows become NaN.
def family_model(name):
    torch.manual_seed(0)
    return FAMILIES[name]().double().eval()


def model_logits(model, ids, attn):
    """The model's own forward: [B, T, V] logits, transform included."""
    with torch.no_grad():
        return model(
            input_ids=ids,
            attention_mask=attn.long(),
            position_ids=causal_lm.position_ids_from(attn),
        ).logits


def decoder_hidden(model, ids, attn):
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        return causal_lm.decode(model, embeds, attn.long())


def test_transforms_are_read_from_the_config():
    assert causal_lm.logit_transform(family_model("gemma2-softcap")).softcap == 0.2
    assert causal_lm.logit_transform(family_model("cohere-scale")).scale == 8.0
    assert causal_lm.logit_transform(family_model("granite-scaling")).scale == 8.0
    from tests.helpers import tiny_causal_lm

    assert causal_lm.logit_transform(tiny_causal_lm("llama")) == causal_lm.LogitTransform()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_and_logprobs_equal_the_models_forward(family, monkeypatch):
    model = family_model(family)
    ids, attn, *_ = ragged_rollouts(seed=1, left_pad=False)
    want = model_logits(model, ids, attn)
    hidden = decoder_hidden(model, ids, attn)
    assert_verbose_allclose(causal_lm.head_logits(model, hidden), want, rtol=1e-10, atol=1e-12)
    # The plain head differs: the test can see a missing transform.
    plain = torch.nn.functional.linear(hidden, model.get_output_embeddings().weight)
    assert (plain - want).abs().max() > 1e-2
    # Soft-capped logprobs are made in row chunks: three rows a chunk here.
    monkeypatch.setitem(CHUNK_BYTES, "cpu", 3 * 4 * TINY_VOCAB)
    targets = ids[:, 1:]
    got = causal_lm.head_logprobs(model, hidden[:, :-1], targets)
    expected = torch.log_softmax(want[:, :-1], -1).gather(-1, targets[..., None])[..., 0]
    assert_verbose_allclose(got, expected, rtol=1e-10, atol=1e-12, name="logprobs")


@pytest.mark.parametrize("family", FAMILIES)
def test_outcome_logprob_is_the_models(family):
    # phi, the mean answer logprob answer_joint differentiates, from the model's logits.
    model = family_model(family)
    ids, attn, _, answer, *_ = ragged_rollouts(seed=2, left_pad=False)
    logp = torch.log_softmax(model_logits(model, ids, attn), -1)
    counts = answer[:, 1:].sum(1)
    answers = answer[:, 1:].nonzero_static(size=int(counts.sum()))
    hidden = decoder_hidden(model, ids, attn)
    got = gradient._answer_logprob_mean(model, hidden, ids, answer, answers)
    for r in range(ids.shape[0]):
        cols = answer[r].nonzero().flatten()
        want = logp[r, cols - 1, ids[r, cols]].mean() if len(cols) else torch.tensor(0.0)
        assert_verbose_allclose(got[r], want, rtol=1e-10, atol=1e-12, name=f"row {r}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_scores_equal_the_per_sequence_reference_on_the_models_logits(family, mode):
    model = family_model(family)
    ids, attn, score, answer, noise, per_row = ragged_rollouts(seed=3, left_pad=False)
    got = ok.gradient_importance(model, ids, attn, score, answer, mode=mode, _noise=noise)
    for r, (row_ids, s, a, row_noise, cols) in enumerate(per_row):
        want = reference_row(model, row_ids, s, a, mode, row_noise)
        assert_verbose_allclose(got[r, cols], want, rtol=1e-6, atol=1e-12, name=f"row {r}")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gradient", "gradient-noised", "perturbation"])
def test_old_logprobs_are_the_models(family, method):
    model = family_model(family)
    ids, attn, score, answer, *_ = ragged_rollouts(seed=4, left_pad=False)
    kwargs = {"method": "perturbation", "mask_token_id": 0} if method == "perturbation" else {}
    if method == "gradient-noised":  # the clean forward gives them, not the noised one
        kwargs = {"noise_std": 1e-2, "generator": torch.Generator().manual_seed(0)}
    out = ok.oar_advantages(model, ids, attn, score, answer, torch.ones(4), **kwargs)
    logp = torch.log_softmax(model_logits(model, ids, attn), -1)
    want = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    valid = attn[:, 1:] & attn[:, :-1]
    assert_verbose_allclose(
        out.old_logprobs[:, 1:], torch.where(valid, want, 0.0), rtol=1e-5, atol=1e-6
    )
