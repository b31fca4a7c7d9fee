"""Dynamic-dLLM's dynamic cache updating (DCU): which tokens a layer recomputes this step.

Full-sequence denoising recomputes every token at every layer; DCU caches each layer's keys,
values, attention outputs and FFN outputs and, per layer, recomputes only
- a forced window of ``window`` tokens centred on the key token (the most recently committed
  position): a token skipped at layer l keeps an unchanged input at l + 1 and would otherwise
  never look changed again;
- the layer's budget of other response tokens whose features changed most since the previous
  step, by dissimilarity 1 - cos(v_t, v_{t-1}) of the layer's value projection.
Budgets follow the previous step's layer dynamism (mean dissimilarity): a total of
``layer_budget * n_layers`` tokens shared by softmax(200 * s_l) over the partially recomputed
layers (layer 0 is always fully recomputed, so it takes no share).
"""

from __future__ import annotations

import torch

ALLOCATION_TEMPERATURE = 200.0  # the released code's softmax(200 * s)


def dissimilarity(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """1 - cos over the last dim (per token)."""
    return 1.0 - torch.nn.functional.cosine_similarity(new.float(), old.float(), dim=-1)


def layer_budgets(scores: torch.Tensor, total: int) -> torch.Tensor:
    """[B, L] long: floor(total * softmax(200 * scores)) over the L partially recomputed layers;
    ``scores`` [B, L] is each layer's mean dissimilarity at the previous step."""
    weights = torch.softmax(ALLOCATION_TEMPERATURE * scores.double(), dim=-1)
    return (total * weights).floor().long()


def key_window(key: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """[B, n] bool: ``size`` columns starting at key - size // 2, shifted to lie inside [0, n)
    (all n when size >= n). ``key`` [B]: each row's key token column."""
    start = (key - size // 2).clamp(min=0, max=max(n - size, 0))
    cols = torch.arange(n, device=key.device)[None]
    return (cols >= start[:, None]) & (cols < start[:, None] + size)


def select_tokens(dissim: torch.Tensor, window: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: the window plus the ``budget[b]`` most changed tokens outside it (ties to
    the lower column). ``dissim`` [B, n], ``window`` [B, n] bool, ``budget`` [B]."""
    d = dissim.float().masked_fill(window, float("-inf"))
    order = d.argsort(dim=1, descending=True, stable=True)
    room = (~window).sum(1)
    keep = torch.arange(d.shape[1], device=d.device)[None] < torch.minimum(budget, room)[:, None]
    return torch.zeros_like(window).scatter(1, order, keep) | window
