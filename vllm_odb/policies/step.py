"""One denoising decision: canvas logits in, predictions and the commit mask out.

This is the function both engines call for every step of the plain decoders; the ODB policies
(length prediction, drafts, acceptance) build on its outputs.
"""

from __future__ import annotations

import torch

from vllm_odb.policies.commit import commit_factor, commit_threshold, commit_topk
from vllm_odb.policies.confidence import drop_token, predict
from vllm_odb.policies.config import DecodeConfig


def decide(
    logits: torch.Tensor,
    masked: torch.Tensor,
    cfg: DecodeConfig,
    mask_id: int,
    quota: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, N, V] for the N canvas positions of a block; masked [B, N].
    Returns (x0 [B, N], conf [B, N], commit [B, N] bool, a subset of ``masked``).
    The mask token itself is never predicted (its logit is dropped before the softmax).
    ``threshold`` ([B] or [B, N], from ``policies.adaptive``) replaces ``cfg.threshold`` of the
    threshold rule; rule='adaptive' requires it (APD's per-position thresholds)."""
    x0, conf = predict(drop_token(logits, mask_id), cfg.confidence, cfg.temperature, generator)
    if cfg.rule == "quota":
        if quota is None:
            raise ValueError("rule='quota' needs a per-row quota")
        commit = commit_topk(conf, masked, quota)
    elif cfg.rule in ("threshold", "adaptive"):
        if threshold is None and cfg.rule == "adaptive":
            raise ValueError("rule='adaptive' needs per-position thresholds (policies.adaptive.BlockThresholds)")
        commit = commit_threshold(conf, masked, cfg.threshold if threshold is None else threshold)
    else:
        commit = commit_factor(conf, masked, cfg.factor)
    return x0, conf, commit
