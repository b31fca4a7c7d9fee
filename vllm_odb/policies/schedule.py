"""How many tokens a quota-rule step commits."""

from __future__ import annotations

import torch


def linear_quota(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: spread each row's ``num_masked`` [B] over ``steps`` steps, the remainder
    going to the first steps. Returns [B, steps] long; each row sums to its ``num_masked``."""
    n = num_masked.long().view(-1, 1)
    base = n // steps
    extra = (torch.arange(steps, device=n.device)[None] < (n % steps)).long()
    return base + extra


def dream_quota(num_masked_mean: float, step: int, steps: int, eps: float = 1e-3) -> int:
    """Dream's diffusion_generate schedule: timesteps linspace(1, eps, steps + 1) in float32,
    k = int(num_masked * (1 - s / t)), and everything left on the last step. ``num_masked_mean`` is
    the masked count averaged over the batch, as in the reference."""
    ts = torch.linspace(1.0, eps, steps + 1, dtype=torch.float32)
    if step >= steps - 1:
        return int(num_masked_mean)
    t, s = ts[step], ts[step + 1]
    return int(torch.tensor(num_masked_mean, dtype=torch.float32) * (1 - s / t))
