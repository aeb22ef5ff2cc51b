"""OARGRPOTrainer against the real TRL: a few GRPO steps on CPU with a tiny model and a
tokenizer built here; the per-token advantages reaching TRL's loss equal the package's ops."""

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install '.[oar]')")
datasets = pytest.importorskip("datasets", reason="datasets is not installed (comes with trl)")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import oar_kernels as ok  # noqa: E402
from oar_kernels.integrations.trl import OARGRPOTrainer  # noqa: E402
from oar_kernels.loss import LOSS_TYPES  # noqa: E402

PROMPTS = [
    "What is 2 + 3? Think, then write \\boxed{answer}.",
    "What is 4 + 4? Answer in \\boxed{}.",
]


def _tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(
        PROMPTS * 10 + ["2 + 3 = 5 so \\boxed{5}", "4 + 4 = 8 \\boxed{8}"] * 10, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")


def _reward(completions, **_):
    return [float("\\boxed{" in c) + 0.1 * len(c) % 1.0 for c in completions]


def make_trainer_parts(tmp_path, **config):
    """Keyword arguments of a tiny GRPO trainer (seeded: every process builds the same);
    `config` overrides GRPOConfig fields."""
    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        **config,
    )
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS * 4})
    return dict(
        model=LlamaForCausalLM(model_config),
        reward_funcs=_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.fixture
def trainer_parts(tmp_path):
    return make_trainer_parts(tmp_path)


def _package_advantages(model, tokenizer, out, per_sequence):
    """What the package's own ops give for a generated batch: [B, T_completion]."""
    prompt_len = out["prompt_ids"].shape[1]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1).bool()
    completion = torch.cat([torch.zeros_like(out["prompt_mask"]), out["completion_mask"]], 1)
    score, answer = ok.spans.completion_spans(tokenizer, ids, completion.bool())
    scores = ok.gradient_importance(model, ids, attn, score, answer, noise_std=0.0)
    return ok.reshape_advantages(per_sequence, scores, score)[:, prompt_len:]


def _last_tokens_as_answer(tokenizer, input_ids, completion_mask, **_):
    """Spans for a random model, which never writes an answer: each completion's last two
    tokens are its answer and the rest its reasoning (with no answer span, the noiseless
    answer_joint objective scores every token 0 and the reshape has nothing to do)."""
    ends = completion_mask.cumsum(1)
    lengths = ends[:, -1:]
    answer = completion_mask & (ends > lengths - 2) & (lengths >= 4)
    return completion_mask & ~answer, answer


def _row_key(inputs, r):
    return (tuple(inputs["prompt_ids"][r].tolist()), tuple(inputs["completion_ids"][r].tolist()))


def test_trains_and_per_token_advantages_equal_the_package_ops(trainer_parts, monkeypatch):
    expected, received = {}, []
    base = trl.GRPOTrainer._generate_and_score_completions

    def scored_by_package(self, inputs):
        out = base(self, inputs)
        model = self.accelerator.unwrap_model(self.model)
        want = _package_advantages(model, self.processing_class, out, out["advantages"])
        for r in range(want.shape[0]):
            expected[_row_key(out, r)] = want[r]
        return out

    class Recording(OARGRPOTrainer):
        def _compute_loss(self, model, inputs):
            received.append({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super()._compute_loss(model, inputs)

    monkeypatch.setattr(trl.GRPOTrainer, "_generate_and_score_completions", scored_by_package)
    monkeypatch.setattr(ok.spans, "completion_spans", _last_tokens_as_answer)
    trainer = Recording(**trainer_parts, oar_method="gradient", oar_mode="answer_joint")
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any("oar/top10_mass" in entry for entry in trainer.state.log_history)
    assert received
    # The reshape did something: some row's advantage varies along its completion.
    assert any((adv != adv[:1]).any() for inputs in received for adv in inputs["advantages"])
    for inputs in received:
        got = inputs["advantages"]
        assert got.dim() == 2 and got.shape == inputs["completion_ids"].shape
        for r in range(got.shape[0]):
            want = expected[_row_key(inputs, r)]
            torch.testing.assert_close(got[r], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("use_liger_kernel", True, "use_liger_kernel"),
        ("loss_type", "luspo", "token-level"),
    ],
)
def test_refuses_options_without_per_token_advantages(trainer_parts, option, value, message):
    setattr(trainer_parts["args"], option, value)
    if option == "loss_type":
        trainer_parts["args"].importance_sampling_level = "sequence"
    with pytest.raises(ValueError, match=message):
        OARGRPOTrainer(**trainer_parts)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"oar_method": "saliency"}, "oar_method"),
        ({"oar_mode": "first"}, "oar_mode"),
        ({"oar_reshape": {"noise_std": 0.1}}, "oar_reshape"),
    ],
)
def test_refuses_unknown_oar_options(trainer_parts, option, message):
    with pytest.raises(ValueError, match=message):
        OARGRPOTrainer(**trainer_parts, **option)


ACCUMULATION = 2


def _loss_batch(trainer, seed=0):
    """A batch as TRL's loss sees it: left-padded prompts, right-padded completions shorter
    than max_completion_length, per-token advantages, old and reference logprobs near the
    current ones (ratios straddle the clip range), and the step's token count."""
    gen = torch.Generator().manual_seed(seed)
    vocab, rows, prompt, width = trainer.model.config.vocab_size, 4, 5, 7
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[1, :2] = 0
    completion_mask = (torch.arange(width) < torch.tensor([[7], [4], [6], [1]])).long()
    batch = {
        "prompt_ids": torch.randint(2, vocab, (rows, prompt), generator=gen) * prompt_mask,
        "prompt_mask": prompt_mask,
        "completion_ids": torch.randint(2, vocab, (rows, width), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(rows, width, generator=gen),
        # the generation batch on every process: more tokens than this micro-batch
        "num_items_in_batch": completion_mask.sum() * ACCUMULATION + 3,
    }
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, attention, width
        )
    batch["old_per_token_logps"] = logps + 0.3 * torch.randn(rows, width, generator=gen)
    batch["ref_per_token_logps"] = logps + 0.2 * torch.randn(rows, width, generator=gen)
    return batch


def _full_logits_logps(trainer, model, input_ids, attention_mask, logits_to_keep, **_):
    """TRL's per-token logprobs and entropies from full logits (TRL's own fused head is off
    by up to 1e-3 in a logprob on CPU float32; the op's are within 5e-7 of these)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logp = torch.log_softmax(logits[:, -logits_to_keep - 1 : -1] / trainer.temperature, -1)
    targets = input_ids[:, -logits_to_keep:, None]
    return logp.gather(-1, targets)[..., 0], -(logp.exp() * logp).sum(-1), None


def _parts_with_reference(tmp_path, **config):
    """Trainer parts whose model TRL can load again as the reference model (beta > 0): the
    model is saved and named by its path."""
    parts = make_trainer_parts(tmp_path, **config)
    path = tmp_path / "policy"
    parts["model"].save_pretrained(path)
    return {**parts, "model": str(path)}


def _trl_loss_and_grads(trainer, model, inputs, params, *, full_logits):
    if full_logits:
        trainer._get_per_token_logps_and_entropies = _full_logits_logps.__get__(trainer)
    try:
        loss = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
    finally:
        trainer.__dict__.pop("_get_per_token_logps_and_entropies", None)
    return loss, torch.autograd.grad(loss, params)


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_loss_equals_trls_compute_loss(tmp_path, loss_type, beta):
    parts = _parts_with_reference(
        tmp_path,
        loss_type=loss_type,
        beta=beta,
        use_bias_correction_kl=False,
        gradient_accumulation_steps=ACCUMULATION,
        epsilon_high=0.28,
        temperature=0.9,
    )
    trainer = OARGRPOTrainer(**parts, oar_fused_loss=True)
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = ACCUMULATION  # as the training loop sets it
    inputs = _loss_batch(trainer)
    params = [p for p in model.parameters() if p.requires_grad]
    got = trainer._compute_loss(model, inputs)
    got_grads = torch.autograd.grad(got, params)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    # TRL's loss term by term (its logprobs from full logits): equal to rounding.
    want, want_grads = _trl_loss_and_grads(trainer, model, inputs, params, full_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for name, g, w in zip(names, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # TRL's _compute_loss as it runs: within its fused head's logprob error.
    trl_loss, trl_grads = _trl_loss_and_grads(trainer, model, inputs, params, full_logits=False)
    torch.testing.assert_close(got, trl_loss, rtol=2e-3, atol=1e-5)
    for name, g, w in zip(names, got_grads, trl_grads):
        assert (g - w).norm() <= 1e-2 * w.norm() + 1e-6, name
    region = trainer._metrics["train"]["clip_ratio/region_mean"]
    assert len(region) == 3 and region[0] == pytest.approx(region[1], abs=1e-6)


def test_trains_with_the_fused_loss_and_accumulation(tmp_path, monkeypatch):
    parts = make_trainer_parts(tmp_path, loss_type="dapo", gradient_accumulation_steps=2)
    monkeypatch.setattr(ok.spans, "completion_spans", _last_tokens_as_answer)
    trainer = OARGRPOTrainer(**parts, oar_fused_loss=True)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert any("clip_ratio/region_mean" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"loss_type": "cispo"}, "loss_type 'cispo'"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"beta": 0.1}, "use_bias_correction_kl"),
    ],
)
def test_fused_loss_refuses_terms_it_does_not_compute(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        OARGRPOTrainer(**_parts_with_reference(tmp_path, **option), oar_fused_loss=True)
