"""`oar-kernels reshape-demo`: reshape one GRPO batch and show what OAR does to it.

Synthetic rollouts: each row is prompt + reasoning + answer; a few reasoning tokens carry
most of the importance (as OAR-G/OAR-P scores do). Prints the per-token advantages of a
few rows, then times the reshape on a training-sized batch on this machine.
"""

import time

import torch

from oar_kernels import _info
from oar_kernels.reshape import bilevel_weights, reshape_advantages

PROMPT, REASONING, ANSWER = 6, 18, 3


def synthetic_batch(batch: int, generator: torch.Generator):
    """scores [B, T], score_mask [B, T] bool, group-normalised advantages [B]."""
    length = PROMPT + REASONING + ANSWER
    score_mask = torch.zeros(batch, length, dtype=torch.bool)
    score_mask[:, PROMPT : PROMPT + REASONING] = True
    scores = torch.rand(batch, length, generator=generator) * 0.05
    pivotal = torch.randint(PROMPT, PROMPT + REASONING, (batch, 3), generator=generator)
    scores.scatter_(1, pivotal, torch.rand(batch, 3, generator=generator) * 2 + 1)
    rewards = (torch.arange(batch) % 2).float()  # half the group solved the task
    advantages = (rewards - rewards.mean()) / (rewards.std(correction=0) + 1e-4)
    return scores, score_mask, advantages


def _bar(value: float) -> str:
    return "#" * min(int(round(value * 4)), 12)


def run(batch: int = 4, seed: int = 0, timing_shape=(256, 2048)) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores, score_mask, advantages = synthetic_batch(batch, gen)
    weights = bilevel_weights(scores, score_mask)
    per_token = reshape_advantages(advantages, scores, score_mask)
    print(f"backend: cpu -> {_info.backends()['reshape_advantages']['cpu']}")
    for b in range(batch):
        print(f"\nrollout {b}: GRPO advantage {advantages[b].item():+.3f} on every token")
        print("   pos  span       score   weight   OAR advantage")
        for t in range(PROMPT, PROMPT + REASONING + 1):
            span = "reasoning" if score_mask[b, t] else "answer"
            print(
                f"  {t:4d}  {span:<9} {scores[b, t].item():6.3f}   {weights[b, t].item():6.3f}"
                f"   {per_token[b, t].item():+7.3f} {_bar(weights[b, t].item())}"
            )
        mean_w = weights[b][score_mask[b]].mean().item()
        print(f"  mean weight over the reasoning span: {mean_w:.4f} (mass preserved)")

    rows, cols = timing_shape
    big_scores = torch.rand(rows, cols, generator=gen).pow(4)
    big_mask = torch.rand(rows, cols, generator=gen) < 0.8
    big_adv = torch.randn(rows, generator=gen)
    reshape_advantages(big_adv, big_scores, big_mask)
    start = time.perf_counter()
    for _ in range(10):
        reshape_advantages(big_adv, big_scores, big_mask)
    ms = (time.perf_counter() - start) / 10 * 1e3
    print(f"\nreshape of a [{rows}, {cols}] batch on the CPU: {ms:.2f} ms")
