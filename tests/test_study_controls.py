"""Controls and faithfulness metrics on hand-built rows."""

import pytest
import torch

from oar_kernels.grpo import faithfulness as fa
from oar_kernels.grpo.config import TrainConfig
from oar_kernels.grpo.controls import permute_weights


def rows():
    weights = torch.tensor(
        [[1.0, 0.2, 1.5, 0.3, 2.0, 1.0], [1.0, 1.0, 0.5, 0.5, 1.7, 1.3], [1.0] * 6]
    )
    score_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [0] * 6], dtype=torch.bool)
    return weights, score_mask


@pytest.mark.parametrize("control", ["shuffled", "inverted"])
def test_controls_keep_each_rows_multiset_of_weights(control):
    weights, mask = rows()
    out = permute_weights(weights, mask, control, torch.Generator().manual_seed(0))
    for w, o, m in zip(weights, out, mask):
        assert sorted(o[m].tolist()) == sorted(w[m].tolist())
        assert torch.equal(o[~m], w[~m])  # outside the span: untouched


def test_inverted_gives_the_largest_weight_the_smallest_place():
    weights, mask = rows()
    out = permute_weights(weights, mask, "inverted")
    assert out[0, 1:5].tolist() == pytest.approx([2.0, 0.3, 1.5, 0.2])
    assert out[1, 2:6].tolist() == pytest.approx([1.7, 1.3, 0.5, 0.5])


def test_shuffles_are_seeded_and_move_weights():
    weights = torch.arange(1.0, 41.0)[None]
    mask = torch.ones_like(weights, dtype=torch.bool)
    first = permute_weights(weights, mask, "shuffled", torch.Generator().manual_seed(3))
    again = permute_weights(weights, mask, "shuffled", torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not torch.equal(first, weights)
    with pytest.raises(ValueError, match="control"):
        permute_weights(weights, mask, "reversed")


def test_control_methods_name_their_estimator():
    assert TrainConfig(method="oar-p-shuffled").importance == "perturbation"
    assert TrainConfig(method="oar-p-shuffled").control == "shuffled"
    assert TrainConfig(method="oar-g-inverted").control == "inverted"
    assert TrainConfig(method="oar-g").importance == "gradient"
    assert TrainConfig(method="oar-g").control is None
    assert TrainConfig(method="grpo").importance is None


def test_fillers_count_only_on_the_filler_task():
    assert TrainConfig(task="filler", fillers=5).filler_count == 5
    assert TrainConfig(task="addition", fillers=5).filler_count == 0


def test_ess_ratio_is_one_for_uniform_weights_and_one_over_n_for_a_spike():
    mask = torch.ones(2, 4, dtype=torch.bool)
    weights = torch.tensor([[1.0, 1, 1, 1], [4.0, 0, 0, 0]])
    assert fa.ess_ratio(weights, mask).tolist() == pytest.approx([1.0, 0.25])
    weights, mask = rows()
    # (0.2+1.5+0.3+2)^2 / (4 * (0.04+2.25+0.09+4)); the unscored third row is left out
    assert fa.ess_ratio(weights, mask)[0].item() == pytest.approx(16 / (4 * 6.38))
    assert fa.ess_ratio(weights, mask).numel() == 2


def test_filler_share_pools_scored_weight_mass():
    weights, mask = rows()
    filler = torch.zeros_like(mask)
    filler[0, 1] = filler[0, 3] = filler[1, 2] = True
    filler[0, 0] = True  # not scored: does not count
    share, tokens = fa.filler_share(weights, mask, filler)
    assert share == pytest.approx((0.2 + 0.3 + 0.5) / (4.0 + 4.0))
    assert tokens == pytest.approx(3 / 8)
    assert fa.filler_share(weights, mask, torch.zeros_like(mask)) == (0.0, 0.0)


def test_first_departure_skips_fillers_and_finds_the_first_wrong_token():
    reference = "1+2=3. So"
    right = list("fg1+2=3.hh So") + ["<eos>"]
    assert fa.first_departure(right, reference, "fgh") is None
    wrong = list("f1+2=4. So")
    assert fa.first_departure(wrong, reference, "fgh") == 5  # the "4"
    assert fa.first_departure(list("1+2=3"), reference, "fgh") is None  # cut short
    assert fa.first_departure(list("1+2=3. So!"), reference, "fgh") == 9  # not <eos>


def test_rank_percentile_and_departure_percentile():
    values = torch.tensor([0.1, 0.5, 2.0, 0.5])
    assert fa.rank_percentile(values, 2) == 1.0
    assert fa.rank_percentile(values, 0) == 0.0
    assert fa.rank_percentile(values, 1) == pytest.approx((1 + 0.5) / 3)
    assert fa.rank_percentile(torch.ones(5), 3) == 0.5  # uniform weights: the middle
    weights, mask = rows()
    assert fa.departure_percentile(weights[0], mask[0], 4) == 1.0  # the 2.0
    assert fa.departure_percentile(weights[0], mask[0], 0) is None  # not scored


def test_batch_metrics_of_uniform_weights_are_the_grpo_baseline():
    _, mask = rows()
    filler = torch.zeros_like(mask)
    filler[0, 2] = True
    record = fa.batch_metrics(torch.ones(3, 6), mask, filler, [3, None, 1])
    assert record["ess_ratio"] == 1.0
    assert record["filler_weight_share"] == record["filler_token_share"] == 1 / 8
    assert record["departure_percentile"] == 0.5 and record["departure_rows"] == 1
    assert "departure_percentile" not in fa.batch_metrics(torch.ones(3, 6), mask, filler, [])
