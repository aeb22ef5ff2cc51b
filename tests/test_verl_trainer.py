"""verl's own PPO loop, `RayPPOTrainer.fit` (verl 0.9), one step on CPU with `oar_grpo` and the
two hooks, in one process.

verl's code that runs: the trainer config composed by Hydra from verl's `ppo_trainer.yaml`,
`RayPPOTrainer.__init__` (its `RLHFDataset` over a parquet file, sampler, `StatefulDataLoader`,
`collate_fn`), and `fit`: uids, rollout.n repeat, `DataProto` unions, response mask, batch
balancing, the padded <-> no-padding conversions, `_compute_old_log_prob`, reward extraction,
the advantage step (`ray_trainer.compute_advantage`, routed by `install_advantage_step`), the
actor-update call and the metrics; the rewards come from verl's `default_compute_score` (MATH
`\\boxed{}`), the policy loss from verl's registry (`vanilla`, PPO clip, token-mean).

What cannot start on CPU is replaced by an in-process stand-in doing the same job (the README's
verl section says why each cannot start): the rollout replica (vLLM/SGLang, CUDA only) replays
fixed responses; the actor worker group (Ray actors of FSDP workers) runs the tiny model on the
driver; the weight sync between them is a no-op because they share the model.
"""

import copy
import importlib.util

import numpy as np
import pytest
import torch

import oar_kernels as ok
from oar_kernels.grpo.task import build_tokenizer
from oar_kernels.integrations import verl as plugin

TAU = 0.3  # algorithm.oar.tau, not the default: the hook must read verl's config
DATA_SOURCE = "lighteval/MATH"  # verl's default_compute_score: last \boxed{} vs ground truth
PROMPTS = {"Q: 12+7=?\n": "19", "Q: 3+4=?\n": "7"}
# The rollout's responses, in verl's order: each prompt's rollout.n = 2 samples side by side.
RESPONSES = {
    "Q: 12+7=?\n": ["2+7 is 9 so \\boxed{19}", "no idea"],
    "Q: 3+4=?\n": ["3+4=7 \\boxed{7}", "so \\boxed{8}"],
}


def _verl_missing() -> str | None:
    if importlib.util.find_spec("verl") is None:
        return 'verl is not installed (pip install "oar-kernels[verl]")'
    try:
        import verl.trainer.ppo.ray_trainer  # noqa: F401
    except ImportError as error:
        return f"verl's trainer does not import: {error}"
    return None


pytestmark = pytest.mark.skipif(_verl_missing() is not None, reason=str(_verl_missing()))


def _tiny_model(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _sequence_log_probs(model, td):
    """Per token of verl's no-padding batch: log p(next token) and entropy (verl's layout,
    position j scores token j + 1), nested like td["input_ids"]."""
    ids, positions = td["input_ids"], td["position_ids"]
    log_probs, entropies = [], []
    for row, pos in zip(ids.unbind(), positions.unbind()):
        logits = model(input_ids=row[None], position_ids=pos[None]).logits[0, :-1].float()
        logp = logits.log_softmax(-1)
        pad = logp.new_zeros(1)
        log_probs.append(torch.cat([logp.gather(-1, row[1:, None])[:, 0], pad]))
        entropies.append(torch.cat([-(logp.exp() * logp).sum(-1), pad]))
    offsets = ids.offsets()
    as_nested = [
        torch.nested.nested_tensor_from_jagged(torch.cat(t), offsets=offsets)
        for t in (log_probs, entropies)
    ]
    return tuple(as_nested)


class ActorStandIn:
    """verl's actor worker group (Ray actors of FSDP workers) in this process: one data-parallel
    rank, the tiny model, verl's registered policy loss; plus the OAR actor-step hook."""

    def __init__(self, model, tokenizer, actor_config):
        from verl.trainer.ppo import core_algos

        self.model, self.tokenizer, self.config = model, tokenizer, actor_config
        self.policy_loss = core_algos.get_policy_loss_fn(actor_config.policy_loss.loss_mode)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        self._dispatch_info = {}
        self.updates = []  # the batches update_actor received

    def _query_dispatch_info(self, role):
        return [0]

    def compute_log_prob(self, td):
        from verl.utils import tensordict_utils as tu

        with torch.no_grad():
            log_probs, entropy = _sequence_log_probs(self.model, td)
        return tu.get_tensordict(
            {"log_probs": log_probs, "entropy": entropy}, non_tensor_dict={"metrics": {"mfu": 0.0}}
        )

    def compute_oar_weights(self, data, algorithm_config):
        """Hook 1, where the actor model is: `oar_weights` [B, R] for the batch."""
        from verl import DataProto

        keys = ["input_ids", "attention_mask", "response_mask", "responses"]
        view = data.select(batch_keys=keys)
        plugin.add_oar_weights(view, self.model, self.tokenizer, algorithm_config)
        return DataProto.from_dict({"oar_weights": view.batch["oar_weights"]})

    def update_actor(self, td):
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        self.updates.append(td.clone())
        self.model.train()
        log_probs, _ = _sequence_log_probs(self.model, td)
        log_prob = no_padding_2_padding(log_probs, td)
        loss, metrics = self.policy_loss(
            old_log_prob=td["old_log_probs"],
            log_prob=log_prob,
            advantages=td["advantages"],
            response_mask=td["response_mask"],
            loss_agg_mode=self.config.loss_agg_mode,
            config=self.config,
        )
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
        self.optimizer.step()
        self.model.eval()
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update({"pg_loss": loss.item(), "grad_norm": grad_norm.item(), "mfu": 0.0})
        return tu.get_tensordict({}, non_tensor_dict={"metrics": metrics})


class RolloutStandIn:
    """verl's AgentLoopManager (vLLM/SGLang replicas): replays RESPONSES, scores them with
    verl's default_compute_score into `rm_scores` as the agent loop's reward step does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate_sequences(self, gen_batch):
        from verl import DataProto
        from verl.utils.reward_score import default_compute_score

        tok, pad = self.tokenizer, self.tokenizer.pad_token_id
        prompts = [messages[-1]["content"] for messages in gen_batch.non_tensor_batch["raw_prompt"]]
        seen = {}
        responses = []
        for p in prompts:
            responses.append(RESPONSES[p][seen.get(p, 0)])
            seen[p] = seen.get(p, 0) + 1
        p_ids = [tok.encode(p) for p in prompts]
        r_ids = [tok.encode(r) + [tok.eos_token_id] for r in responses]
        width_p, width_r = max(map(len, p_ids)), max(map(len, r_ids))
        rows = len(prompts)
        prompt_t = torch.full((rows, width_p), pad)
        response_t = torch.full((rows, width_r), pad)
        prompt_m = torch.zeros(rows, width_p, dtype=torch.long)
        response_m = torch.zeros(rows, width_r, dtype=torch.long)
        scores = torch.zeros(rows, width_r)
        for b, (p, r) in enumerate(zip(p_ids, r_ids)):
            prompt_t[b, width_p - len(p) :], prompt_m[b, width_p - len(p) :] = torch.tensor(p), 1
            response_t[b, : len(r)], response_m[b, : len(r)] = torch.tensor(r), 1
            info = gen_batch.non_tensor_batch
            truth = info["reward_model"][b]["ground_truth"]
            scores[b, len(r) - 1] = default_compute_score(
                info["data_source"][b], responses[b], truth
            )
        attention = torch.cat([prompt_m, response_m], 1)
        tensors = {
            "prompts": prompt_t,
            "responses": response_t,
            "response_mask": response_m,
            "input_ids": torch.cat([prompt_t, response_t], 1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp_min(0),
            "rm_scores": scores,
        }
        empty = np.array([{} for _ in range(rows)], dtype=object)
        return DataProto.from_dict(
            tensors, non_tensors={"multi_modal_inputs": empty}, meta_info={"timing": {}}
        )


class Nothing:
    """verl's checkpoint manager (trainer -> rollout weight sync) and resource pools: the
    stand-ins share one model on the driver, so there is nothing to sync or place."""

    def update_weights(self, step):
        pass

    def sleep_replicas(self):
        pass

    def get_n_gpus(self):
        return 1


def _config(tmp_path):
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


def test_verl_fit_runs_oar_grpo_with_both_hooks(tmp_path, monkeypatch):
    from verl.trainer.ppo import ray_trainer
    from verl.trainer.ppo.utils import Role
    from verl.utils.config import omega_conf_to_dataclass

    monkeypatch.setattr(ray_trainer, "compute_advantage", ray_trainer.compute_advantage)
    plugin.install_advantage_step()  # hook 2: verl's advantage step hands oar_grpo the weights
    config = _config(tmp_path)
    tokenizer = build_tokenizer()
    model = _tiny_model(len(tokenizer))
    policy = copy.deepcopy(model)  # the policy before verl's update, for the expectations
    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor = ActorStandIn(model, tokenizer, actor_config)

    trainer = _trainer_class()(
        config=config,
        tokenizer=tokenizer,
        role_worker_mapping={Role.ActorRollout: object},
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
    torch.testing.assert_close(td["advantages"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(td["returns"], want)
    # OAR made the advantages per token: a rewarded row's tokens do not share one value.
    assert any((a[m.bool()] != a[0]).any() for a, m in zip(td["advantages"], td["response_mask"]))
    # verl's old log-probs (its no-padding round trip) are the policy's, before the update.
    old = _package_old_log_probs(policy, rows, td["response_mask"])
    real = td["response_mask"].bool()
    torch.testing.assert_close(td["old_log_probs"][real], old[real], rtol=1e-4, atol=1e-5)
    # The update ran verl's vanilla loss and moved the model.
    assert any((p != q).any() for p, q in zip(policy.parameters(), model.parameters()))


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
