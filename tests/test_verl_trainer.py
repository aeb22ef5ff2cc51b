"""verl's own PPO loop, `RayPPOTrainer.fit` (verl 0.9.1), one `oar_grpo` step on CPU with the
two hooks, verl's FSDP2 actor worker included, in one fresh process.

verl's code that runs: the trainer config composed by Hydra from verl's `ppo_trainer.yaml`;
`RayPPOTrainer.__init__` (its `RLHFDataset` over a parquet file, sampler, `StatefulDataLoader`,
`collate_fn`); `fit` (uids, rollout.n repeat, `DataProto` unions, response mask, balancing, the
padded <-> no-padding conversions, the old-log-prob step, reward extraction, the advantage
step routed by `install_advantage_step`, the actor update, metrics); rewards from verl's
`default_compute_score` (MATH `\\boxed{}`); and verl's actor worker `ActorRolloutRefWorker`
(role actor: the FSDP2 engine loading the model from a directory, `compute_log_prob`,
`update_actor` with verl's PPO loss and AdamW), called in this process instead of through Ray.

To run on CPU at all, verl 0.9.1 needs a CPU platform (it registers nvidia, huawei and amd
only, falls back to nvidia and asks for NCCL and `torch.cuda.set_device`): `_use_cpu` sets one.
What cannot start on CPU is replaced by a stand-in doing the same job (see the README's verl
section): the rollout replica (vLLM/SGLang/TensorRT-LLM, GPU only) replays fixed responses;
Ray's worker group is one worker called directly; the weight sync to the rollout is a no-op.
"""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import oar_kernels as ok
from oar_kernels.grpo.task import build_tokenizer
from oar_kernels.integrations import verl as plugin
from tests.helpers import tiny_causal_lm

TAU = 0.3  # algorithm.oar.tau, not the default: the hook must read verl's config
DATA_SOURCE = "lighteval/MATH"  # verl's default_compute_score: last \boxed{} vs ground truth
PROMPTS = {"Q: 12+7=?\n": "19", "Q: 3+4=?\n": "7"}
# The rollout's responses, in verl's order: each prompt's rollout.n = 2 samples side by side.
RESPONSES = {
    "Q: 12+7=?\n": ["2+7 is 9 so \\boxed{19}", "no idea"],
    "Q: 3+4=?\n": ["3+4=7 \\boxed{7}", "so \\boxed{8}"],
}
# verl 0.9.1's trainer imports these, which its own requirements do not declare.
NEEDS = ("verl", "cachetools", "uvicorn", "fastapi")
ROOT = Path(__file__).parents[1]  # the fresh process imports tests.helpers from here


def _verl_missing() -> str | None:
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        extra = " ".join(NEEDS[1:])
        return f'{", ".join(missing)} not installed: pip install "oar-kernels[verl]" {extra}'
    return None


pytestmark = pytest.mark.skipif(_verl_missing() is not None, reason=str(_verl_missing()))


def test_verl_fit_runs_oar_grpo_with_both_hooks_and_verls_fsdp_actor(tmp_path):
    # A fresh interpreter: the CPU platform must be in place before verl's engines import, and
    # the process group is global state.
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    assert "verl fit on CPU: passed" in done.stdout


def _use_cpu():
    """A CPU platform for verl, a one-process gloo group, and verl's FSDP engine chosen for it."""
    import contextlib

    import torch.distributed as dist
    from verl.plugin.platform import platform_manager
    from verl.plugin.platform.platform_base import PlatformBase

    class DeviceModule:
        """torch.cpu, and 0 for the memory queries verl asks of a device module."""

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            if name == "get_device_name":
                return lambda *_: "CPU"  # verl's flops table knows "CPU"
            if hasattr(torch.cpu, name):
                return getattr(torch.cpu, name)
            return lambda *_, **__: (0, 0) if name == "mem_get_info" else 0

    class PlatformCPU(PlatformBase):
        device_name, vendor_name, device_module = "cpu", "cpu", DeviceModule()

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"  # verl moves modules to this

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        manual_seed_all = manual_seed

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return (None, None)

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CPU_VISIBLE_DEVICES"

        def nvtx_range(self, msg):
            return contextlib.nullcontext()

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    platform_manager.set_platform(PlatformCPU())
    # verl registers its FSDP engine for cuda and npu only; it runs on the platform above.
    os.environ.update(VERL_ENGINE_DEVICE="cuda", VERL_ENGINE_VENDOR="nvidia")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    # The TRL installed beside verl has no AutoModelForCausalLMWithValueHead, which verl's
    # model patch would touch; the actor does not use it.
    from verl.models.transformers import monkey_patch

    monkey_patch.is_trl_available = lambda: False


class ActorGroup:
    """Ray's actor worker group: verl's own `ActorRolloutRefWorker` (role actor), one rank,
    called directly; plus the OAR actor-step hook run on that worker's model."""

    def __init__(self, worker, tokenizer):
        self.worker, self.tokenizer = worker, tokenizer
        self._dispatch_info = {}
        self.updates = []  # the batches update_actor received

    def _query_dispatch_info(self, role):
        return [0]  # one data-parallel rank

    def compute_log_prob(self, td):
        return self.worker.compute_log_prob(td)

    def update_actor(self, td):
        self.updates.append(td.clone())
        return self.worker.update_actor(td)

    @property
    def module(self):
        return self.worker.actor.engine.module

    def compute_oar_weights(self, data, algorithm_config):
        """Hook 1, where the actor model is: `oar_weights` [B, R] for the batch."""
        from verl import DataProto

        keys = ["input_ids", "attention_mask", "response_mask", "responses"]
        view = data.select(batch_keys=keys)
        plugin.add_oar_weights(view, self.module, self.tokenizer, algorithm_config)
        return DataProto.from_dict({"oar_weights": view.batch["oar_weights"]})


class RolloutStandIn:
    """verl's AgentLoopManager (vLLM/SGLang replicas): replays RESPONSES, scores them with
    verl's default_compute_score into `rm_scores` as the agent loop's reward step does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_sequences(self, gen_batch):
        from verl import DataProto
        from verl.utils.reward_score import default_compute_score

        tok = self.tokenizer
        prompts = [messages[-1]["content"] for messages in gen_batch.non_tensor_batch["raw_prompt"]]
        seen = {}
        rows = []
        for p in prompts:
            rows.append(dict(prompt=p, response=RESPONSES[p][seen.get(p, 0)]))
            seen[p] = seen.get(p, 0) + 1
        width_r = max(len(tok.encode(r["response"])) for r in rows) + 1  # + eos
        ids, attention, width_p = _layout(rows, tok, torch.zeros(len(rows), width_r))
        response_mask = attention[:, width_p:]
        scores = torch.zeros(response_mask.shape)
        info = gen_batch.non_tensor_batch
        for b, row in enumerate(rows):
            truth = info["reward_model"][b]["ground_truth"]
            score = default_compute_score(info["data_source"][b], row["response"], truth)
            scores[b, response_mask[b].sum() - 1] = score
        tensors = {
            "prompts": ids[:, :width_p],
            "responses": ids[:, width_p:],
            "response_mask": response_mask,
            "input_ids": ids,
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp_min(0),
            "rm_scores": scores,
        }
        empty = np.array([{} for _ in rows], dtype=object)
        return DataProto.from_dict(
            tensors, non_tensors={"multi_modal_inputs": empty}, meta_info={"timing": {}}
        )


class Nothing:
    """verl's checkpoint manager (trainer -> rollout weight sync) and resource pools: the
    rollout stand-in replays text and the worker runs in this process: nothing to sync or place."""

    def update_weights(self, step):
        pass

    def sleep_replicas(self):
        pass

    def get_n_gpus(self):
        return 1


def _config(tmp_path, model_dir):
    import os

    import pandas as pd
    import verl
    from hydra import compose, initialize_config_dir

    rows = [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": prompt}],
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"index": i},
        }
        for i, (prompt, truth) in enumerate(PROMPTS.items())
    ]
    data = tmp_path / "train.parquet"
    pd.DataFrame(rows).to_parquet(data)
    overrides = [
        "algorithm.adv_estimator=oar_grpo",
        f"+algorithm.oar.tau={TAU}",
        f"data.train_files=[{data}]",
        f"data.val_files=[{data}]",
        "data.train_batch_size=2",
        "data.dataloader_num_workers=0",
        "data.filter_overlong_prompts=False",
        "data.shuffle=False",
        "actor_rollout_ref.rollout.n=2",
        f"actor_rollout_ref.model.path={model_dir}",
        # No flash-attn and no CUDA: PyTorch attention, padded batches, FSDP2 in float32.
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision="
        "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "trainer.device=cpu",
        "trainer.logger=[console]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.resume_mode=disable",
        "trainer.total_training_steps=1",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def _trainer_class():
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    class OARTrainer(RayPPOTrainer):
        """Hook 1 on the driver: the old-log-prob step also brings the actor's oar_weights."""

        def _compute_old_log_prob(self, batch):
            old_log_prob, mfu = super()._compute_old_log_prob(batch)
            weights = self.actor_rollout_wg.compute_oar_weights(batch, self.config.algorithm)
            return old_log_prob.union(weights), mfu

    return OARTrainer


def _save_tiny_model(directory):
    """A tiny random Llama and the character tokenizer, saved as verl's actor loads them."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    tiny_causal_lm("llama", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory).eval()  # the policy before the update


def _fit_on_cpu(tmp_path):
    """One step of verl's fit with oar_grpo, then checks of the batch verl updated on."""
    _use_cpu()
    from verl.trainer.ppo.utils import Role
    from verl.workers.engine_workers import ActorRolloutRefWorker

    plugin.install_advantage_step()  # hook 2: verl's advantage step hands oar_grpo the weights
    policy = _save_tiny_model(tmp_path / "model")
    config = _config(tmp_path, tmp_path / "model")
    tokenizer = build_tokenizer()
    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    actor = ActorGroup(worker, tokenizer)
    _check_hook_on_fsdp(actor.module, policy, tokenizer)

    trainer = _trainer_class()(
        config=config,
        tokenizer=tokenizer,
        role_worker_mapping={Role.ActorRollout: ActorRolloutRefWorker},
        resource_pool_manager=Nothing(),
        device_name="cpu",
    )
    trainer.actor_rollout_wg = actor
    trainer.async_rollout_manager = RolloutStandIn(tokenizer)
    trainer.checkpoint_manager = Nothing()
    trainer.fit()

    (td,) = actor.updates  # verl's batch as its trainer sent it to the actor update
    rows = _rows(td, tokenizer)
    want = _package_advantages(policy, rows, td["response_mask"])
    torch.testing.assert_close(td["advantages"], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(td["returns"], td["advantages"])
    # OAR made the advantages per token: a rewarded row's tokens do not share one value.
    assert any((a[m.bool()] != a[0]).any() for a, m in zip(td["advantages"], td["response_mask"]))
    # verl's old log-probs (its FSDP actor, no-padding round trip) are the policy's.
    old = _package_old_log_probs(policy, rows, td["response_mask"])
    real = td["response_mask"].bool()
    torch.testing.assert_close(td["old_log_probs"][real], old[real], rtol=1e-4, atol=1e-5)
    # verl's update (PPO loss, AdamW) moved the actor's weights.
    after = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in actor.module.parameters()]
    assert any((p != q).any() for p, q in zip(policy.parameters(), after))
    print("verl fit on CPU: passed")


def _check_hook_on_fsdp(module, policy, tokenizer):
    """OAR-G and OAR-P through verl's FSDP2-wrapped actor give the plain model's weights."""
    rows = [
        dict(prompt=prompt, response=response)
        for prompt, responses in RESPONSES.items()
        for response in responses
    ]
    width_r = max(len(tokenizer.encode(r["response"])) for r in rows) + 1
    ids, attn, width_p = _layout(rows, tokenizer, torch.zeros(len(rows), width_r))
    mask = attn[:, width_p:]
    for method in ("gradient", "perturbation"):
        config = {"method": method, "tau": TAU}
        got = plugin.response_weights(module, tokenizer, ids, attn, mask, config)
        want = plugin.response_weights(policy, tokenizer, ids, attn, mask, config)
        torch.testing.assert_close(got.weights, want.weights, rtol=1e-4, atol=1e-5)
        assert (got.weights != 1).any(), method


def _rows(td, tokenizer):
    """Per row of verl's (reordered) batch: prompt text, response text, group id, reward."""
    rows = []
    for b in range(td["prompts"].shape[0]):
        prompt = tokenizer.decode(td["prompts"][b], skip_special_tokens=True)
        length = int(td["response_mask"][b].sum())
        response = tokenizer.decode(td["responses"][b, : length - 1])
        reward = float(td["token_level_rewards"][b].sum())
        rows.append(dict(prompt=prompt, response=response, uid=td["uid"][b], reward=reward))
        # verl's default_compute_score gave 1 exactly to the right \boxed{} answers.
        assert reward == float(f"\\boxed{{{PROMPTS[prompt]}}}" in response), rows[-1]
    assert sorted(r["reward"] for r in rows) == [0.0, 0.0, 1.0, 1.0]
    return rows


def _layout(rows, tokenizer, response_mask):
    """The rows in verl's layout again, built from their text: [B, P + R] ids and mask."""
    pad = tokenizer.pad_token_id
    p_ids = [tokenizer.encode(r["prompt"]) for r in rows]
    r_ids = [tokenizer.encode(r["response"]) + [tokenizer.eos_token_id] for r in rows]
    width_p, width_r = max(map(len, p_ids)), response_mask.shape[1]
    ids = torch.full((len(rows), width_p + width_r), pad)
    attn = torch.zeros_like(ids)
    for b, (p, r) in enumerate(zip(p_ids, r_ids)):
        ids[b, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r)
        attn[b, width_p - len(p) : width_p + len(r)] = 1
    return ids, attn, width_p


def _package_advantages(policy, rows, response_mask):
    """GRPO by hand over verl's uids, reshaped by the package's public ops: [B, R]."""
    tokenizer = build_tokenizer()
    ids, attn, width_p = _layout(rows, tokenizer, response_mask)
    completion = torch.zeros_like(attn, dtype=torch.bool)
    completion[:, width_p:] = response_mask.bool()
    score, answer = ok.spans.completion_spans(tokenizer, ids, completion)
    scores = ok.gradient_importance(policy, ids, attn, score, answer, noise_std=0.0)
    grpo = torch.empty(len(rows))
    for b, row in enumerate(rows):
        group = torch.tensor([r["reward"] for r in rows if r["uid"] == row["uid"]])
        grpo[b] = (row["reward"] - group.mean()) / (group.std() + 1e-6)
    per_token = ok.reshape_advantages(grpo, scores, score, tau=TAU)
    return per_token[:, width_p:] * response_mask


def _package_old_log_probs(policy, rows, response_mask):
    tokenizer = build_tokenizer()
    ids, attn, width_p = _layout(rows, tokenizer, response_mask)
    with torch.no_grad():
        logits = policy(
            input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0)
        ).logits
    return logits[:, width_p - 1 : -1].log_softmax(-1).gather(-1, ids[:, width_p:, None])[..., 0]


def _advantage_batch():
    """A verl batch after the reward step: two groups of two, weights that are not all 1."""
    from verl import DataProto

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    rewards = torch.zeros(4, 4)
    rewards[torch.arange(4), mask.sum(1) - 1] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    tensors = {
        "token_level_rewards": rewards,
        "response_mask": mask,
        "oar_weights": torch.linspace(0.5, 1.5, 16).reshape(4, 4),
    }
    return DataProto.from_dict(tensors, non_tensors={"uid": np.array(list("aabb"), dtype=object)})


def test_stock_advantage_step_refuses_oar_grpo_and_the_routed_one_passes_the_weights(monkeypatch):
    from omegaconf import OmegaConf
    from verl.trainer.ppo import ray_trainer

    config = OmegaConf.create({"adv_estimator": "oar_grpo", "norm_adv_by_std_in_grpo": True})
    stock = ray_trainer.compute_advantage
    # verl's own advantage step hands an estimator fixed fields only: no weights, a clear error.
    with pytest.raises(ValueError, match="install_advantage_step|add_oar_weights"):
        stock(_advantage_batch(), adv_estimator="oar_grpo", config=config)

    monkeypatch.setattr(ray_trainer, "compute_advantage", stock)
    plugin.install_advantage_step()
    plugin.install_advantage_step()  # idempotent: one wrapper, not two
    routed = ray_trainer.compute_advantage
    assert routed is not stock and routed.oar_routed
    data = _advantage_batch()
    grpo = stock(_advantage_batch(), adv_estimator="grpo", config=config).batch["advantages"]
    got = routed(data, adv_estimator="oar_grpo", config=config).batch["advantages"]
    torch.testing.assert_close(got, grpo * data.batch["oar_weights"] * data.batch["response_mask"])
    # Every other estimator is verl's, unchanged; no config: norm_adv_by_std_in_grpo is used.
    torch.testing.assert_close(routed(_advantage_batch(), "grpo").batch["advantages"], grpo)
    unnormed = stock(_advantage_batch(), "grpo", norm_adv_by_std_in_grpo=False).batch["advantages"]
    got = routed(_advantage_batch(), "oar_grpo", norm_adv_by_std_in_grpo=False).batch["advantages"]
    torch.testing.assert_close(
        got, unnormed * data.batch["oar_weights"] * data.batch["response_mask"]
    )


if __name__ == "__main__":  # the fresh process of test_verl_fit_runs_oar_grpo_with_both_hooks_...
    _fit_on_cpu(Path(sys.argv[1]))
