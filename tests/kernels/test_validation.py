"""Bad input: a clear error naming the argument, never a silent wrong answer."""

import pytest
import torch

from golden_data import config_from_case
from vimpo_kernels import VIMPOConfig, fused_linear_logprobs, fused_vimpo_loss, vimpo_loss

B, T, V, H = 3, 4, 11, 5


def _args(**over):
    g = torch.Generator().manual_seed(0)
    a = dict(
        logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64),
        ref_logprobs=-torch.rand(B, T, generator=g, dtype=torch.float64),
        token_kl=torch.rand(B, T, generator=g, dtype=torch.float64),
        mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
        rewards=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
        group_ids=torch.tensor([0, 0, 1]),
    )
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    kw = {k: a.pop(k) for k in list(a) if k not in ("logprobs", "ref_logprobs", "token_kl", "mask", "rewards",
                                                      "group_ids")}
    return vimpo_loss(a["logprobs"], a["ref_logprobs"], a["token_kl"], a["mask"], a["rewards"], a["group_ids"], **kw)


def test_valid_call_works():
    loss, metrics = _call()
    assert torch.isfinite(loss)
    assert all(v.dim() == 0 for k, v in metrics.items())


@pytest.mark.parametrize("over, exc, words", [
    ({"logprobs": torch.zeros(B, T, 2, dtype=torch.float64)}, ValueError, "logprobs"),
    ({"logprobs": torch.zeros(B, T, dtype=torch.long)}, TypeError, "logprobs"),
    ({"ref_logprobs": torch.zeros(B, T + 1, dtype=torch.float64)}, ValueError, "ref_logprobs"),
    ({"ref_logprobs": None}, ValueError, "ref_logprobs"),
    ({"token_kl": None}, ValueError, "token_kl"),
    ({"token_kl": torch.zeros(B, dtype=torch.float64)}, ValueError, "token_kl"),
    ({"mask": torch.zeros(B, T)}, ValueError, "no valid token"),
    ({"mask": torch.full((B, T), 2)}, ValueError, "mask"),
    ({"mask": torch.ones(B, T + 1)}, ValueError, "mask"),
    ({"rewards": torch.zeros(B + 1, dtype=torch.float64)}, ValueError, "rewards"),
    ({"rewards": torch.zeros(B, dtype=torch.long)}, TypeError, "rewards"),
    ({"rewards": torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64)}, ValueError, "rewards"),
    ({"rewards": torch.tensor([1.0, float("inf"), 0.0], dtype=torch.float64)}, ValueError, "rewards"),
    ({"group_ids": torch.tensor([0, 1])}, ValueError, "group_ids"),
    ({"group_ids": torch.tensor([0.0, 0.0, 1.0])}, TypeError, "group_ids"),
    ({"logprobs": torch.tensor([[float("nan")] * T] * B, dtype=torch.float64)}, ValueError, "logprobs"),
    ({"old_logprobs": torch.zeros(B, T - 1, dtype=torch.float64)}, ValueError, "old_logprobs"),
    ({"rollout_is_weights": torch.zeros(T, dtype=torch.float64)}, ValueError, "rollout_is_weights"),
    ({"baseline": torch.zeros(B + 2, dtype=torch.float64)}, ValueError, "baseline"),
    ({"config": "paper"}, TypeError, "config"),
    ({"config": VIMPOConfig(kl_estimator="k3")}, ValueError, "token_kl"),
    ({"config": VIMPOConfig(value_type="soft")}, ValueError, "old_token_kl"),
    ({"config": VIMPOConfig(whiten_variance="unbiased"), "mask": torch.tensor([[1, 0, 0, 0], [0] * 4, [0] * 4])},
     ValueError, "at least 2 valid tokens"),
    ({"config": VIMPOConfig(value_loss_normalized=True), "rewards": torch.tensor([1.0, 1.0, 0.0],
                                                                                  dtype=torch.float64)},
     ValueError, "value_norm_denom"),
], ids=lambda v: None)
def test_bad_loss_input(over, exc, words):
    with pytest.raises(exc, match=words):
        _call(**over)


def test_nan_at_padding_is_ignored_and_cannot_leak():
    lp = _args()["logprobs"].clone()
    lp[0, 3] = float("nan")  # mask is 0 there
    loss, _ = _call(logprobs=lp)
    assert torch.isfinite(loss)


def test_nan_policy_ignore_skips_the_check():
    lp = _args()["logprobs"].clone()
    lp[1, 1] = float("nan")
    loss, _ = _call(logprobs=lp, config=VIMPOConfig(nan_policy="ignore"))
    assert torch.isnan(loss)


def _lin(**over):
    g = torch.Generator().manual_seed(1)
    a = dict(hidden=torch.randn(B, T, H, generator=g), weight=torch.randn(V, H, generator=g),
             targets=torch.randint(0, V, (B, T), generator=g))
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, words", [
    ({"hidden": torch.randn(H)}, ValueError, "hidden"),
    ({"hidden": torch.randint(0, 3, (B, T, H))}, TypeError, "hidden"),
    ({"weight": torch.randn(V, H + 1)}, ValueError, "weight"),
    ({"targets": torch.full((B, T), V)}, ValueError, "outside the vocabulary"),
    ({"targets": torch.full((B, T), -1)}, ValueError, "outside the vocabulary"),
    ({"targets": torch.zeros(B, T + 1, dtype=torch.long)}, ValueError, "targets"),
    ({"targets": torch.zeros(B, T)}, TypeError, "targets"),
    ({"bias": torch.zeros(V + 1)}, ValueError, "bias"),
    ({"ref_weight": torch.randn(V + 2, H)}, ValueError, "vocabulary"),
    ({"ref_hidden": torch.randn(B, T + 1, H)}, ValueError, "ref_hidden"),
    ({"kl": "exact"}, ValueError, "reference"),
    ({"kl": "k3", "ref_weight": torch.randn(V, H)}, ValueError, "kl"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"backend": "tpu"}, ValueError, "backend"),
], ids=lambda v: None)
def test_bad_linear_input(over, exc, words):
    a = _lin(**over)
    with pytest.raises(exc, match=words):
        fused_linear_logprobs(a.pop("hidden"), a.pop("weight"), a.pop("targets"), **a)


def test_out_of_range_targets_are_fine_where_masked():
    a = _lin()
    targets = a["targets"].clone()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    targets[0, -1] = -100  # the usual ignore index at padding
    stats = fused_linear_logprobs(a["hidden"], a["weight"], targets, mask=mask, backend="torch")
    assert stats.logprobs[0, -1] == 0 and torch.isfinite(stats.logprobs).all()


def test_fused_loss_requires_reference_for_vimpo():
    a = _lin()
    with pytest.raises(ValueError, match="reference"):
        fused_vimpo_loss(a["hidden"], a["weight"], a["targets"], torch.ones(B, T), torch.ones(B),
                         torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("field, value", [
    ("algorithm", "ppo"), ("kl_estimator", "k1"), ("beta", -1.0), ("beta", float("nan")), ("lam", 1.5),
    ("clip_ratio_c", 1.0), ("huber_delta", 0.0), ("temperature", 0.0), ("loss_agg_mode", "mean"),
    ("whiten_variance", "sample"), ("adaptive_ema_decay", 1.0), ("nan_policy", "zero"),
    ("candidate_kl_topk", 0),
])
def test_bad_config_names_the_field(field, value):
    kwargs = {field: value}
    if field == "candidate_kl_topk":
        kwargs["kl_estimator"] = "candidate_set"
    with pytest.raises(ValueError, match=field):
        VIMPOConfig(**kwargs)


def test_golden_case_mapping_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        config_from_case({"beta": 0.1, "bogus": 1})


def test_old_token_kl_outside_the_soft_value_type_is_refused():
    """Both epilogues refuse it the same way (the compiled one would otherwise raise a bare
    TypeError and the reference silently ignore it)."""
    lp = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="old_token_kl= applies to value_type='soft'"):
        vimpo_loss(lp, lp, lp, mask, torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0]),
                   config=VIMPOConfig(), old_token_kl=lp)


def test_the_forward_gradient_route_refuses_a_loss_it_does_not_implement():
    from vimpo_kernels.vimpo_loss.forward_grad import forward_grad_loss
    with pytest.raises(ValueError, match="not algorithm='cispo'"):
        forward_grad_loss(None, None, None, torch.ones(1, 1), None, None, config=VIMPOConfig.for_algorithm("cispo"))
