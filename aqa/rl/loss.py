"""The GRPO objective: clipped importance ratio times advantage, minus beta times KL to the reference.

Pure tensor functions on per-token log-probs; shapes are ``[N, T]`` with N = B*G completions (any
leading shape works, it is flattened) and a mask that is 1 on real completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    """Detached diagnostics of one loss evaluation."""

    kl: float  # mean k3 KL, averaged per token then per completion (as the loss)
    clip_frac: float  # fraction of real tokens where the clipped branch of the surrogate is taken
    ratio_mean: float  # mean importance ratio over real tokens


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(q - p) - (q - p) - 1``, q = ref, p = policy.

    Shapes: any, elementwise. Non-negative, and 0 exactly where the log-probs agree.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


def _per_completion_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` -> ``[N]``: mean over each completion's own tokens (1/|o_i| sum_t)."""
    return (values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float,
    beta: float,
) -> tuple[torch.Tensor, LossStats]:
    """``-1/N sum_i 1/|o_i| sum_t [min(r A, clip(r, 1-eps, 1+eps) A) - beta KL_t]``.

    ``logp``: ``[..., T]`` policy log-probs of the sampled tokens (with grad).
    ``old_logp``: same shape, log-probs of the policy that sampled them; None when
    ``num_iterations == 1`` (then the ratio is 1 in value and only carries the gradient).
    ``ref_logp``: same shape, reference log-probs; None when ``beta == 0``.
    ``advantages``: ``[...]`` one per completion. ``mask``: ``[..., T]`` 1 on real tokens.
    Returns the scalar loss and ``LossStats``.
    """
    T = logp.shape[-1]
    logp = logp.reshape(-1, T)
    mask = mask.reshape(-1, T).to(logp.device, logp.dtype)
    adv = advantages.reshape(-1, 1).to(logp.device, logp.dtype)  # [N, 1] (rewards are computed on the CPU)
    if adv.shape[0] != logp.shape[0]:
        raise ValueError(f"{adv.shape[0]} advantages for {logp.shape[0]} completions.")
    old = logp.detach() if old_logp is None else old_logp.reshape(-1, T).to(logp.dtype)

    ratio = torch.exp(logp - old)  # [N, T]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)  # [N, T]

    kl_tok = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs reference log-probs; pass ref_logp or set beta: 0.")
        kl_tok = k3_kl(logp, ref_logp.reshape(-1, T).to(logp.dtype))
        per_token = per_token + beta * kl_tok

    loss = _per_completion_mean(per_token, mask).mean()

    with torch.no_grad():
        # The clipped branch is taken (and the gradient is zero) when the ratio left the trust region
        # in the direction the advantage pushes it.
        is_clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + epsilon) & (adv > 0))
        n_tok = mask.sum().clamp(min=1.0)
        stats = LossStats(
            kl=float(_per_completion_mean(kl_tok.detach(), mask).mean()),
            clip_frac=float((is_clipped.to(mask.dtype) * mask).sum() / n_tok),
            ratio_mean=float((ratio * mask).sum() / n_tok),
        )
    return loss, stats
