"""GRPO math on hand-worked values: advantages, the clipped loss, the k3 KL estimator."""

import math

import pytest
import torch

from aqa.rl.advantages import group_advantages
from aqa.rl.loss import grpo_loss, k3_kl


def test_advantages_hand_worked():
    # Group [1,0,0,0]: mean 0.25, unbiased std sqrt(0.75/3) = 0.5 -> [1.5, -0.5, -0.5, -0.5].
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.5]])
    a = group_advantages(r, eps=0.0)
    assert torch.allclose(a.values[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # Group [0, .5, 1, .5]: mean .5, std sqrt(0.5/3).
    s = math.sqrt(0.5 / 3)
    assert torch.allclose(a.values[1], torch.tensor([-0.5 / s, 0.0, 0.5 / s, 0.0]))
    assert a.zero_std.tolist() == [False, False]
    eps = 1e-4
    assert torch.allclose(group_advantages(r, eps=eps).values[0, 0], torch.tensor(0.75 / (0.5 + eps)))


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_equal_rewards_give_zero_advantage_and_no_nan(value):
    r = torch.full((2, 6), value)
    a = group_advantages(r, eps=0.0)  # eps 0 would divide 0/0 without the guard
    assert torch.equal(a.values, torch.zeros(2, 6))
    assert a.zero_std.all() and a.zero_std_frac == 1.0


def test_gather_normalises_over_all_ranks_and_returns_own_rows():
    rank0 = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    rank1 = torch.tensor([[1.0, 1.0, 1.0, 1.0]])

    def gather(x):  # what an all-gather along dim 0 returns on either rank
        return torch.cat([rank0, rank1])

    a1 = group_advantages(rank1, eps=0.0, gather=gather, rank=1)
    assert torch.equal(a1.values, torch.zeros(1, 4))
    assert a1.reward_mean == pytest.approx(5 / 8)
    assert a1.zero_std_frac == pytest.approx(0.5)
    a0 = group_advantages(rank0, eps=0.0, gather=gather, rank=0)
    assert torch.allclose(a0.values, torch.tensor([[1.5, -0.5, -0.5, -0.5]]))
    assert a0.zero_std.tolist() == [False]


def test_advantages_reject_single_completion():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.ones(3, 1), eps=1e-4)


def test_k3_kl_hand_worked():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    # delta = log(0.5): 0.5 - log(0.5) - 1 = 0.193147...; equal log-probs give exactly 0.
    assert torch.allclose(k3_kl(logp, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()


def test_clipped_loss_positive_advantage():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))  # ratios 2 and 1
    mask = torch.ones(1, 2)
    loss, st = grpo_loss(logp, old, None, torch.tensor([1.0]), mask, epsilon=0.2, beta=0.0)
    # token 1: min(2, 1.2) = 1.2; token 2: 1 -> -(1.2 + 1) / 2
    assert loss.item() == pytest.approx(-1.1)
    assert st.clip_frac == pytest.approx(0.5)
    assert st.ratio_mean == pytest.approx(1.5)


def test_clipped_loss_negative_advantage_is_not_clipped_upwards():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, st = grpo_loss(logp, old, None, torch.tensor([-1.0]), torch.ones(1, 2), epsilon=0.2, beta=0.0)
    # min(-2, -1.2) = -2; min(-1, -1) = -1 -> (2 + 1) / 2
    assert loss.item() == pytest.approx(1.5)
    assert st.clip_frac == 0.0


def test_clipped_token_has_no_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, _ = grpo_loss(logp, old, None, torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2, beta=0.0)
    loss.backward()
    # token 1 is clipped (constant 1.2); token 2: d/dlogp of -(ratio * A)/2 at ratio 1 = -0.5
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5]]))


def test_average_per_token_then_per_completion():
    # Completion 1 has 1 token with A = +1, completion 2 has 3 tokens with A = -1 (plus one pad).
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    loss, st = grpo_loss(logp, None, None, torch.tensor([1.0, -1.0]), mask, epsilon=0.2, beta=0.0)
    # 1/2 (-1 + 1) = 0, whereas a flat token mean would give (-1 + 3) / 4 = 0.5
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    expected = torch.tensor([[-0.5, 0, 0, 0], [1 / 6, 1 / 6, 1 / 6, 0]])
    assert torch.allclose(logp.grad, expected)
    assert st.clip_frac == 0.0 and st.kl == 0.0


def test_kl_penalty_value_and_gradient():
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25]]))
    loss, st = grpo_loss(logp, None, ref, torch.tensor([0.0]), torch.ones(1, 1), epsilon=0.2, beta=0.1)
    kl = 0.5 + math.log(2) - 1
    assert loss.item() == pytest.approx(0.1 * kl)
    assert st.kl == pytest.approx(kl)
    loss.backward()
    # d/dp [exp(q - p) - (q - p) - 1] = 1 - exp(q - p) = 0.5, times beta
    assert logp.grad.item() == pytest.approx(0.05)


def test_beta_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(torch.zeros(1, 2), None, None, torch.ones(1), torch.ones(1, 2), epsilon=0.2, beta=0.1)


def test_shapes_b_g_t_are_flattened():
    logp = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, 5)
    adv = torch.randn(2, 3)
    a, _ = grpo_loss(logp, None, None, adv, mask, 0.2, 0.0)
    b, _ = grpo_loss(logp.reshape(6, 5), None, None, adv.reshape(6), mask.reshape(6, 5), 0.2, 0.0)
    assert a.item() == pytest.approx(b.item())
    assert a.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
