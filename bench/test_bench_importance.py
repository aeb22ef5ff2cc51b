"""OAR-G: the batched one-pass `gradient_importance` vs the paper's per-sequence loop (clean
forward, noisy forward, `.backward()` on the model, gradient x input, one rollout at a time),
and the overhead of `oar_advantages` over the plain old-logprob forward a GRPO step runs anyway.

    pytest bench/test_bench_importance.py --benchmark-only
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import oar_kernels as ok
from oar_kernels.testing import synchronized

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The lm head outweighs the 4 layers here, as in small real models (Qwen2-0.5B: 136M of 494M).
LENGTH, VOCAB = 256, 32000
BATCHES = [8, 32]


def bench_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
    )
    return LlamaForCausalLM(config).to(DEVICE).eval()


def bench_batch(rows):
    """Right-padded rollouts: a 64-token prompt, a reasoning span, a 4-token answer."""
    gen = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, VOCAB, (rows, LENGTH), generator=gen)
    lengths = torch.randint(LENGTH // 2, LENGTH + 1, (rows,), generator=gen)
    cols = torch.arange(LENGTH)
    attn = cols < lengths[:, None]
    answer = attn & (cols >= lengths[:, None] - 4)
    score = attn & (cols >= 64) & ~answer
    return [t.to(DEVICE) for t in (ids, attn, score, answer)]


def paper_loop(model, ids, attn, score, answer):
    """One rollout at a time, full logits, `.backward()` on the model (as the paper's code)."""
    scores = torch.zeros(ids.shape, device=ids.device)
    embed = model.get_input_embeddings()
    for r in range(ids.shape[0]):
        n = int(attn[r].sum())
        row = ids[r, :n][None]
        positions = answer[r, :n].nonzero().flatten()

        def phi(embeds):
            logp = torch.log_softmax(model(inputs_embeds=embeds).logits[0], -1)
            return logp[positions - 1, row[0, positions]].mean()

        e = embed(row).detach().requires_grad_()
        with torch.no_grad():
            clean = phi(e)
        noisy = e + 1e-3 * torch.randn_like(e) * score[r, :n, None]
        (clean - phi(noisy)).backward()
        scores[r, :n] = (e.grad[0] * e[0].detach()).sum(-1).abs() * score[r, :n]
        model.zero_grad(set_to_none=True)
    return scores


def plain_forward(model, ids, attn, score, answer):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn.long()).logits
        return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])


IMPLS = {
    "paper-loop": paper_loop,
    "batched": lambda m, *b: ok.gradient_importance(m, *b, generator=torch.Generator(DEVICE)),
    "oar_advantages": lambda m, *b: ok.oar_advantages(
        m, *b, torch.ones(b[0].shape[0], device=DEVICE)
    ),
    "plain-forward": plain_forward,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("rows", BATCHES, ids=[f"B{b}" for b in BATCHES])
def test_gradient_importance(benchmark, impl, rows):
    model = bench_model()
    batch = bench_batch(rows)
    benchmark.group = f"OAR-G B={rows} T={LENGTH}"
    benchmark.extra_info.update(impl=impl, baseline=impl == "paper-loop")
    fn = synchronized(lambda: IMPLS[impl](model, *batch), DEVICE)
    fn()
    benchmark.pedantic(fn, rounds=3, warmup_rounds=0)
