"""Which masked positions a denoising step commits. Batched, no Python loop over requests.

All functions take ``conf`` [B, N] (any float; positions that are not masked are ignored) and
``masked`` [B, N] bool, and return a bool [B, N] commit mask that is a subset of ``masked``.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


def _masked_conf(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return conf.float().masked_fill(~masked, float("-inf"))


def _ranks_to_mask(order: torch.Tensor, keep_sorted: torch.Tensor) -> torch.Tensor:
    """Scatter a per-rank keep mask back to positions."""
    out = torch.zeros_like(keep_sorted)
    return out.scatter(1, order, keep_sorted)


def commit_topk(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Commit the ``k[b]`` most confident masked positions of each row (LLaDA low-confidence
    remasking). ``k`` is clipped to the number of masked positions."""
    c = _masked_conf(conf, masked)
    order = c.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(c.shape[1], device=c.device)[None]
    keep = ranks < k.to(c.device).view(-1, 1)
    return _ranks_to_mask(order, keep) & masked


def commit_best(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The single most confident masked position of every row that has one."""
    c = _masked_conf(conf, masked)
    best = torch.zeros_like(masked)
    best.scatter_(1, c.argmax(dim=1, keepdim=True), True)
    return best & masked


def _per_row(value, device) -> float | torch.Tensor:
    """A rule's parameter: a number stays a number (a host-to-device copy would wait for the GPU
    to drain, policies/host.py), a [B] tensor becomes [B, 1], a [B, N] tensor stays."""
    if isinstance(value, numbers.Real):  # rounded to fp32: the comparison is the fp32 one
        return float(np.float32(value))  # (on the host: no tensor, nothing for a step to read back)
    t = torch.as_tensor(value, dtype=torch.float32).to(device)
    return t.view(-1, 1) if t.dim() == 1 else t


def commit_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold) -> torch.Tensor:
    """Fast-dLLM: every masked position with confidence >= threshold, and always the best one so
    that each step makes progress. ``threshold`` is a float, a [B] tensor or a [B, N] tensor."""
    t = _per_row(threshold, conf.device)
    return ((conf.float() >= t) & masked) | commit_best(conf, masked)


def commit_factor(conf: torch.Tensor, masked: torch.Tensor, factor) -> torch.Tensor:
    """Fast-dLLM's factor rule: with c_(1) >= c_(2) >= ... the masked confidences, commit the
    largest n with (n + 1) * (1 - c_(n)) <= factor, at least one. Because c_(n) falls and the
    bound 1 - factor / (n + 1) rises with n, this is the longest passing prefix of the ranks.
    (The released code also commits everything when only the last rank fails; we do not.)"""
    c = _masked_conf(conf, masked)
    order = c.argsort(dim=1, descending=True, stable=True)
    c_sorted = c.gather(1, order)
    n = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=torch.float32)[None]
    f = _per_row(factor, c.device)
    passing = c_sorted >= 1.0 - f / (n + 1.0)
    passing[:, 0] = True
    keep = passing.cumprod(dim=1).bool()
    return _ranks_to_mask(order, keep) & masked
