"""The verl plugin: the actor-step weights and config run everywhere; with verl installed,
`import verl` finds `oar_grpo` through the `verl.plugins` entry point and verl's own registry
lookup gives per-token advantages equal to the package's ops."""

import importlib.metadata
import importlib.util
import sys

import pytest
import torch

import oar_kernels as ok
from oar_kernels.grpo.task import build_tokenizer
from oar_kernels.integrations import verl as plugin
from tests.helpers import assert_python_passes, tiny_causal_lm

PROMPTS = ["Q: 12+7=?\n", "Q: 3+4=?\n", "Q: 12+7=?\n", "Q: 3+4=?\n"]
RESPONSES = ["2+7 is 9 so \\boxed{19}", "3+4=7 \\boxed{7}", "no idea", "so \\boxed{8}"]
GROUPS = ["a", "b", "a", "b"]
REWARDS = [1.0, 1.0, 0.0, 0.0]


def _verl_missing() -> str | None:
    """Why the verl tests cannot run here, or None."""
    if importlib.util.find_spec("verl") is None:
        return 'verl is not installed (pip install "oar-kernels[verl]")'
    try:
        import verl.trainer.ppo.core_algos  # noqa: F401
    except ImportError as error:
        return f"verl does not import: {error}"
    return None


needs_verl = pytest.mark.skipif(_verl_missing() is not None, reason=str(_verl_missing()))


@pytest.fixture(scope="module")
def rollout():
    """verl's layout: prompts left padded to P, responses right padded to R, a tiny model."""
    tokenizer = build_tokenizer()
    pad = tokenizer.pad_token_id
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    responses = [tokenizer.encode(r) for r in RESPONSES]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    rows = len(prompts)
    input_ids = torch.full((rows, width_p + width_r), pad)
    attention_mask = torch.zeros(rows, width_p + width_r, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[b, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r)
        attention_mask[b, width_p - len(p) : width_p + len(r)] = 1
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    return dict(
        model=model,
        tokenizer=tokenizer,
        input_ids=input_ids,
        attention_mask=attention_mask,
        responses=input_ids[:, width_p:],
        response_mask=attention_mask[:, width_p:],
        prompt_width=width_p,
    )


def _package_scores(rollout, method):
    """score_mask and importance [B, P + R] from the package's public ops."""
    ids, attn = rollout["input_ids"], rollout["attention_mask"]
    completion = torch.zeros_like(attn, dtype=torch.bool)
    completion[:, rollout["prompt_width"] :] = rollout["response_mask"].bool()
    score, answer = ok.spans.completion_spans(rollout["tokenizer"], ids, completion)
    if method == "gradient":
        scores = ok.gradient_importance(rollout["model"], ids, attn, score, answer, noise_std=0.0)
    else:
        pad = rollout["tokenizer"].pad_token_id
        scores = ok.perturbation_importance(
            rollout["model"], ids, attn, score, answer, mode="answer_joint", mask_token_id=pad
        )
    return score, scores


def _hook(rollout, config=None):
    keys = ("model", "tokenizer", "input_ids", "attention_mask", "response_mask")
    return plugin.response_weights(*(rollout[k] for k in keys), config)


# ------------------------------------------------------------------ without verl


@pytest.mark.parametrize("method", ["gradient", "perturbation"])
def test_response_weights_equal_the_package_ops(rollout, method):
    out = _hook(rollout, {"method": method})
    score, scores = _package_scores(rollout, method)
    want = ok.bilevel_weights(scores, score)[:, rollout["prompt_width"] :]
    torch.testing.assert_close(out.weights, want, rtol=1e-5, atol=1e-6)
    # The reshape did something, and padding and the answer keep weight 1.
    assert (out.weights != 1).any()
    outside = ~score[:, rollout["prompt_width"] :]
    assert (out.weights[outside] == 1).all()
    assert (out.scores[outside] == 0).all()


def test_old_log_probs_are_the_response_log_probs(rollout):
    out = _hook(rollout)
    ids, attn, width_p = rollout["input_ids"], rollout["attention_mask"], rollout["prompt_width"]
    with torch.no_grad():
        logits = rollout["model"](
            input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp_min(0)
        ).logits
    want = logits[:, width_p - 1 : -1].log_softmax(-1).gather(-1, ids[:, width_p:, None])[..., 0]
    real = rollout["response_mask"].bool()
    torch.testing.assert_close(out.old_log_probs[real], want[real], rtol=1e-4, atol=1e-5)


def test_config_keys():
    assert plugin.OARConfig.from_config(None) == plugin.OARConfig()
    assert plugin.OARConfig.from_config({"tau": 0.3, "mode": "last"}).tau == 0.3
    algorithm = {"adv_estimator": "oar_grpo", "gamma": 1.0, "oar": {"beta": 2.0}}
    assert plugin.OARConfig.from_config(algorithm) == plugin.OARConfig(beta=2.0)
    assert plugin.OARConfig.from_config({"adv_estimator": "oar_grpo"}) == plugin.OARConfig()
    with pytest.raises(ValueError, match="taus"):
        plugin.OARConfig.from_config({"taus": 0.3})
    with pytest.raises(ValueError, match="oar.method"):
        plugin.OARConfig.from_config({"method": "saliency"})


def test_estimator_without_weights_says_where_they_come_from():
    with pytest.raises(ValueError, match="add_oar_weights"):
        plugin.compute_oar_grpo_advantage(torch.zeros(2, 3), torch.ones(2, 3), ["a", "a"])


def test_register_without_verl_names_the_extra(monkeypatch):
    for name in ("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"oar-kernels\[verl\]"):
        plugin.register()


# --------------------------------------------------------------------- with verl


@needs_verl
def test_import_verl_finds_oar_grpo_through_the_entry_point():
    points = importlib.metadata.entry_points(group="verl.plugins")
    if "oar_grpo" not in points.names:
        pytest.skip("oar-kernels is not installed with its entry points (pip install -e .)")
    # A fresh interpreter that imports only verl: the plugin must arrive by discovery.
    assert_python_passes(
        "import sys, verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "fn = get_adv_estimator_fn('oar_grpo')\n"
        "assert fn.__module__ == 'oar_kernels.integrations.verl', fn.__module__\n",
        VERL_USE_EXTERNAL_PLUGINS="auto",
    )


def _data_proto(rollout):
    import numpy as np
    from verl import DataProto

    rewards = torch.zeros(rollout["response_mask"].shape)
    last = rollout["response_mask"].sum(1) - 1
    rewards[torch.arange(len(REWARDS)), last] = torch.tensor(REWARDS)
    tensors = {k: rollout[k] for k in ("input_ids", "attention_mask", "responses", "response_mask")}
    tensors["token_level_rewards"] = rewards
    tensors["advantages"] = torch.full(rewards.shape, float("nan"))  # must be overwritten
    return DataProto.from_dict(tensors, non_tensors={"uid": np.array(GROUPS, dtype=object)})


def _grpo(rewards, groups, norm):
    """Per-sequence GRPO advantages by hand: (r - mean_g) / (std_g + 1e-6)."""
    out = torch.empty(len(rewards))
    for b, g in enumerate(groups):
        same = torch.tensor([r for r, h in zip(rewards, groups) if h == g])
        centred = rewards[b] - same.mean()
        out[b] = centred / (same.std() + 1e-6) if norm else centred
    return out


@needs_verl
@pytest.mark.parametrize("norm", [True, False])
def test_verl_registry_gives_the_package_advantages(rollout, norm):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    plugin.register()
    assert get_adv_estimator_fn("oar_grpo") is plugin.compute_oar_grpo_advantage
    config = OmegaConf.create(
        {"adv_estimator": "oar_grpo", "norm_adv_by_std_in_grpo": norm, "oar": {"tau": 0.25}}
    )
    data = plugin.add_oar_weights(_data_proto(rollout), rollout["model"], rollout["tokenizer"])
    data = plugin.compute_oar_advantage(data, config)

    score, scores = _package_scores(rollout, "gradient")
    per_token = ok.reshape_advantages(_grpo(REWARDS, GROUPS, norm), scores, score)
    mask = rollout["response_mask"]
    want = per_token[:, rollout["prompt_width"] :] * mask
    got = data.batch["advantages"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data.batch["returns"], want)
    assert any((row[m.bool()] != row[m.bool()][:1]).any() for row, m in zip(got, mask))


@needs_verl
def test_unit_weights_give_verls_own_grpo(rollout):
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    data = _data_proto(rollout)
    fields = dict(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"],
    )
    want, _ = get_adv_estimator_fn("grpo")(**fields)
    got, _ = get_adv_estimator_fn("oar_grpo")(
        **fields, oar_weights=torch.ones(want.shape), config={"adv_estimator": "oar_grpo"}
    )
    torch.testing.assert_close(got, want)
