"""Per-position predictions and confidences from canvas logits."""

from __future__ import annotations

import torch


def gumbel_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def drop_token(logits: torch.Tensor, token_id: int) -> torch.Tensor:
    """fp32 logits with ``token_id`` made impossible (the mask token is never a prediction)."""
    out = logits.float()
    if out is logits:  # already fp32: the caller's logits stay as they are
        out = out.clone()
    out[..., token_id] = float("-inf")  # an int index: no host-to-device copy, no stream sync
    return out


def predict(
    logits: torch.Tensor,
    kind: str = "prob",
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [..., V] -> (x0 [...] long, conf [...] float32).

    x0 is the argmax, or at ``temperature > 0`` a Gumbel-max sample in float64 (the same argmax as
    LLaDA's exp(l) / (-log u)^T). The confidence is computed on the unperturbed distribution:
    prob = p(x0) (LLaDA low_confidence, Dream maskgit_plus), margin = p_top1 - p_top2 (Dream
    topk_margin), neg_entropy = sum p log p (Dream entropy; higher is surer).
    """
    logits = logits.float()
    if temperature > 0:
        x0 = (logits.double() + temperature * gumbel_noise(logits.shape, generator, logits.device)).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    probs = torch.softmax(logits, dim=-1)
    if kind == "prob":
        conf = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif kind == "neg_entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    else:
        raise ValueError(f"confidence={kind!r}; choose from ['prob', 'margin', 'neg_entropy']")
    return x0, conf
