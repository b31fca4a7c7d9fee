"""Adaptive length prediction (ALP) and early termination, from ODB-dLLM.

At a refresh forward the decoder already has predictions for the whole remaining canvas. ALP
finds the first place where an end marker is predicted confidently and cuts the canvas (and with
it the KV cache) at the end of the block holding it, so later refreshes process fewer tokens. The
canvas only ever shrinks. End markers are token sequences: the model's EOS / end-of-turn ids
(length 1) plus the request's stop strings, tokenized; a multi-token marker matches only where
every one of its tokens is predicted with confidence >= theta.

Early termination: once a block is fully decoded and completes an end marker, the request is done.
Both engines reach these rules through policies/step.py (``cut_canvas``, ``block_ends``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vllm_odb.policies.confidence import drop_token, predict
from vllm_odb.policies.host import to_device

Marker = tuple[int, ...]
Markers = tuple[Marker, ...]  # one request's end markers


def marker_hits(tokens: torch.Tensor, markers: Sequence[Marker], conf: torch.Tensor | None = None,
                theta: float = 0.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """hits[b, j]: a marker starts at column j of ``tokens`` [B, N] (all of its tokens inside the
    row, ``valid`` there, and with ``conf`` >= theta when ``conf`` is given).

    Few ops, as the engine runs this every decode step (each op is a kernel launch the GPU waits
    for): one comparison per single-token marker (the checkpoint's end ids, the usual case), the
    shifted comparisons of longer ones, one mask for ``valid``/``conf``."""
    b, n = tokens.shape
    ok = valid
    if conf is not None:
        ok = conf >= theta if ok is None else ok & (conf >= theta)
    hits = None
    for tok in sorted({m[0] for m in markers if len(m) == 1}):
        hit = tokens == tok
        hits = hit if hits is None else hits | hit
    if hits is not None and ok is not None:
        hits = hits & ok
    for marker in markers:
        k = len(marker)
        if k <= 1 or k > n:
            continue
        m = None
        for i, tok in enumerate(marker):
            hit = tokens[:, i:n - k + 1 + i] == tok
            if ok is not None:
                hit = hit & ok[:, i:n - k + 1 + i]
            m = hit if m is None else m & hit
        m = torch.nn.functional.pad(m, (0, k - 1))  # starts past n - k hold no whole marker
        hits = m if hits is None else hits | m
    return torch.zeros((b, n), dtype=torch.bool, device=tokens.device) if hits is None else hits


def predict_length(
    x0: torch.Tensor,
    conf: torch.Tensor,
    scan: torch.Tensor,
    offset: int,
    length: torch.Tensor,
    markers: Sequence[Marker],
    theta: float,
    block_length: int,
    min_length: int = 0,
) -> torch.Tensor:
    """New canvas lengths [B] after one ALP check.

    ``x0``/``conf`` [B, N]: predictions for canvas positions offset .. offset+N-1 (``offset`` is
    the start of the current block inside the canvas); ``scan`` [B, N]: which of them may hold a
    marker (still masked and inside the row's canvas); ``length`` [B]: current canvas lengths.
    A hit at canvas position q >= ``min_length`` cuts the canvas after the block containing q.
    The result never exceeds ``length``.
    """
    hits = marker_hits(x0, markers, conf, theta, scan)
    cols = offset + torch.arange(x0.shape[1], device=x0.device)[None]
    hits &= cols >= min_length
    first = torch.where(hits, cols, torch.iinfo(torch.long).max).min(dim=1).values
    cut = (first // block_length + 1) * block_length
    return torch.where(hits.any(1), torch.minimum(cut, length), length)


def row_marker_hits(tokens: torch.Tensor, markers: Sequence[Markers], valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B] row b of ``tokens`` [B, N] holds one of its own end markers ``markers[b]`` (every token
    of it inside the row, and ``valid`` there). Rows usually share their markers (the checkpoint's
    end ids): then one pass; each request's stop strings add a pass per distinct marker."""
    kinds = set(markers)
    if len(kinds) <= 1:
        return marker_hits(tokens, list(next(iter(kinds), ())), valid=valid).any(1)
    hits = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for marker in sorted(set().union(*kinds)):
        rows = to_device([marker in m for m in markers], tokens.device, torch.bool)
        hits |= marker_hits(tokens, [marker], valid=valid).any(1) & rows
    return hits


def canvas_predictions(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ALP reads from a refresh: the greedy prediction and its probability at every canvas
    position of ``logits`` [..., V] (the mask token is never a prediction)."""
    return predict(drop_token(logits, mask_id))
