"""Rollouts: sample completions for a batch of prompts, as padded [N, T] tensors.

Two backends with one interface: `HFRollouts` (transformers' `generate`, the default; works
on CPU) and `VLLMRollouts` (vLLM's public `LLM` / `SamplingParams` API, behind the `vllm`
extra, CUDA only). Both return prompt ⊕ completion rows with the prompt left-padded to one
width, so the completion always starts at column `prompt_width`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

BACKENDS = ("hf", "vllm")


@dataclass
class Rollouts:
    input_ids: torch.Tensor  # [N, T] int64, prompt left-padded, completion right-padded
    attention_mask: torch.Tensor  # [N, T] bool, real tokens
    completion_mask: torch.Tensor  # [N, T] bool, sampled tokens up to and including <eos>
    prompt_width: int  # completions start at this column
    texts: list[str]  # decoded completions (no special tokens)


def _left_pad(prompts: list[list[int]], pad_id: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = True
    return ids, mask


def _assemble(tokenizer, prompts: list[list[int]], completions: list[list[int]]) -> Rollouts:
    """Rollouts from token lists: each completion is cut after its first <eos>."""
    eos = tokenizer.eos_token_id
    cut = [c[: c.index(eos) + 1] if eos in c else c for c in completions]
    prompt_ids, prompt_mask = _left_pad(prompts, tokenizer.pad_token_id)
    width = max(1, max(len(c) for c in cut))
    completion_ids = torch.full((len(cut), width), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(len(cut), width, dtype=torch.bool)
    for i, tokens in enumerate(cut):
        completion_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        completion_mask[i, : len(tokens)] = True
    return Rollouts(
        input_ids=torch.cat([prompt_ids, completion_ids], 1),
        attention_mask=torch.cat([prompt_mask, completion_mask], 1),
        completion_mask=torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1),
        prompt_width=prompt_ids.shape[1],
        texts=tokenizer.batch_decode(cut, skip_special_tokens=True),
    )


class HFRollouts:
    """Sampling with `model.generate` on the policy itself (no weight copies to sync)."""

    name = "hf"

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def sync_weights(self) -> None:
        """Nothing to do: generate runs on the policy's own weights."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, greedy: bool = False, seed: int) -> Rollouts:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        ids, mask = _left_pad(prompts, self.tokenizer.pad_token_id)
        sampling = (
            {"do_sample": False}
            if greedy
            else {"do_sample": True, "temperature": self.temperature, "top_k": 0, "top_p": 1.0}
        )
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **sampling,
        )
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
        self.model.train(was_training)
        completions = out[:, ids.shape[1] :].tolist()
        return _assemble(self.tokenizer, prompts, completions)


class VLLMRollouts:
    """Sampling with vLLM (`pip install 'oar-kernels[vllm]'`, CUDA).

    The policy is saved once to `workdir` and loaded by `vllm.LLM`; after every optimizer
    step `sync_weights` pushes the new parameters into vLLM's model through `LLM.apply_model`
    (the engine runs in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0), so no reload.
    """

    name = "vllm"

    def __init__(self, model, tokenizer, *, max_new_tokens: int, temperature: float, workdir):
        missing = vllm_unavailable()
        if missing:
            raise RuntimeError(missing)
        import vllm

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        model.save_pretrained(workdir)
        tokenizer.save_pretrained(workdir)
        self.vllm, self.model, self.tokenizer = vllm, model, tokenizer
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.llm = vllm.LLM(
            model=str(workdir), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3
        )

    def sync_weights(self) -> None:
        weights = [(name, p.detach()) for name, p in self.model.state_dict().items()]
        self.llm.apply_model(lambda served: served.load_weights(weights))

    def generate(self, prompts: list[list[int]], *, greedy: bool = False, seed: int) -> Rollouts:
        # One seed per request: a group repeats its prompt, and equal seeds would give equal
        # samples.
        params = [
            self.vllm.SamplingParams(
                temperature=0.0 if greedy else self.temperature,
                max_tokens=self.max_new_tokens,
                seed=seed + i,
                stop_token_ids=[self.tokenizer.eos_token_id],
            )
            for i in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        return _assemble(self.tokenizer, prompts, completions)


def vllm_unavailable() -> str | None:
    """Why the vllm backend cannot run here (a sentence), or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return (
            "rollout_backend='vllm' needs vLLM, which is not installed here "
            "(pip install 'oar-kernels[vllm]' on a CUDA machine); use rollout_backend='hf'"
        )
    if not torch.cuda.is_available():
        return "rollout_backend='vllm' needs a CUDA device; use 'hf' on the CPU"
    return None


def make_rollouts(backend: str, model, tokenizer, *, max_new_tokens, temperature, workdir):
    if backend == "hf":
        return HFRollouts(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature)
    if backend == "vllm":
        return VLLMRollouts(
            model,
            tokenizer,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            workdir=workdir,
        )
    raise ValueError(f"rollout_backend must be one of {BACKENDS}, got {backend!r}")
