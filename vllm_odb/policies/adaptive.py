"""Adaptive commit thresholds: Streaming-dLLM's dynamic threshold and Dynamic-dLLM's APD.

Both replace the fixed ``threshold`` of the threshold rule by one that moves during a block; the
commit itself stays ``commit_threshold`` (every masked position at or above its threshold, and
always the most confident one).

- Streaming-dLLM: one threshold per request and step, tau = threshold * (1 - alpha * (1 - r_mask)),
  r_mask = the masked fraction of the positions the step decides over (the block and the suffix it
  sees). Early in a block r_mask ~ 1 and tau ~ threshold; as the block fills, tau falls.
- Dynamic-dLLM APD: one threshold per block position, updated at every forward after the first:
  tau_i <- tau_i - a * c_i + b * H_i, with c_i = 1 - (runner-up probability) (a concentrated
  distribution lowers the bar) and H_i = 1 - cos(p_t, p_{t-1}) over the vocabulary (a prediction
  that moved since the previous forward raises it).
"""

from __future__ import annotations

import torch

from vllm_odb.policies.config import DecodeConfig
from vllm_odb.policies.confidence import drop_token


def masked_ratio(tokens: torch.Tensor, valid: torch.Tensor, mask_id: int) -> torch.Tensor:
    """r_mask over the last dim: masked valid positions / valid positions (0 where none is valid)."""
    n = valid.sum(-1)
    return ((tokens == mask_id) & valid).sum(-1) / n.clamp_min(1)


def dynamic_threshold(threshold: float, alpha: float, ratio: torch.Tensor) -> torch.Tensor:
    """Streaming-dLLM's tau = threshold * (1 - alpha * (1 - r_mask))."""
    return threshold * (1.0 - alpha * (1.0 - ratio.float()))


def apd_update(tau: torch.Tensor, probs: torch.Tensor, prev: torch.Tensor, alpha: float, beta: float,
               floor: float) -> torch.Tensor:
    """One APD step. ``tau`` [...]; ``probs``/``prev`` [..., V]: this and the previous forward's
    distributions at the same positions. Returns the new thresholds, clamped to [floor, 1]."""
    runner_up = probs.topk(2, dim=-1).values[..., 1]
    instability = 1.0 - torch.nn.functional.cosine_similarity(probs, prev, dim=-1)
    return (tau - alpha * (1.0 - runner_up) + beta * instability).clamp(floor, 1.0)


def streaming_threshold(cfg: DecodeConfig, tokens: torch.Tensor, valid: torch.Tensor,
                        mask_id: int) -> torch.Tensor | None:
    """The dynamic threshold [...] for steps deciding over ``tokens`` [..., N] (block + seen
    suffix, ``valid`` marks real positions), or None when ``threshold_alpha`` is 0."""
    if not cfg.threshold_alpha:
        return None
    return dynamic_threshold(cfg.threshold, cfg.threshold_alpha, masked_ratio(tokens, valid, mask_id))


def moving_thresholds(cfg: DecodeConfig) -> bool:
    """The threshold moves during a block (APD, or Streaming-dLLM's dynamic threshold)."""
    return cfg.rule == "adaptive" or bool(cfg.threshold_alpha)


class BlockThresholds:
    """The threshold of each step of one block for a batch of requests that start the block
    together (create one per block: APD state is reset at every block).

    ``step`` returns what ``decide`` takes as ``threshold``: None (the fixed ``cfg.threshold``),
    [B] (Streaming-dLLM) or [B, K] (APD, the state of the block's K positions)."""

    def __init__(self, cfg: DecodeConfig, mask_id: int):
        self.cfg = cfg
        self.mask_id = mask_id
        self.tau: torch.Tensor | None = None
        self.prev: torch.Tensor | None = None

    def step(self, logits: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """``logits`` [B, K, V]: this forward's logits of the block's K positions; ``tokens`` /
        ``valid`` [B, N]: the block and the suffix this step sees (for r_mask)."""
        cfg = self.cfg
        if cfg.rule != "adaptive":
            return streaming_threshold(cfg, tokens, valid, self.mask_id)
        probs = torch.softmax(drop_token(logits, self.mask_id), dim=-1)
        if self.prev is None:
            self.tau = torch.full(probs.shape[:-1], float(cfg.threshold), device=probs.device)
        else:
            self.tau = apd_update(self.tau, probs, self.prev, cfg.apd_alpha, cfg.apd_beta, cfg.apd_min)
        self.prev = probs
        return self.tau
