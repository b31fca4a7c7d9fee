"""Adaptive length prediction (ALP) and early termination, from ODB-dLLM.

At a refresh forward the decoder already has predictions for the whole remaining canvas. ALP
finds the first place where an end marker is predicted confidently and cuts the canvas (and with
it the KV cache) at the end of the block holding it, so later refreshes process fewer tokens. The
canvas only ever shrinks. End markers are token sequences: the model's EOS / end-of-turn ids
(length 1) plus the request's stop strings, tokenized; a multi-token marker matches only where
every one of its tokens is predicted with confidence >= theta.

Early termination: once a block is fully decoded and holds an end marker, the request is done.
"""

from __future__ import annotations

import torch

Marker = tuple[int, ...]


def marker_hits(tokens: torch.Tensor, markers: list[Marker], conf: torch.Tensor | None = None,
                theta: float = 0.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """hits[b, j]: a marker starts at column j of ``tokens`` [B, N] (all of its tokens inside the
    row, ``valid`` there, and with ``conf`` >= theta when ``conf`` is given)."""
    b, n = tokens.shape
    ok = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
    if conf is not None:
        ok = ok & (conf >= theta)
    hits = torch.zeros((b, n), dtype=torch.bool, device=tokens.device)
    for marker in markers:
        k = len(marker)
        if k == 0 or k > n:
            continue
        m = torch.ones((b, n - k + 1), dtype=torch.bool, device=tokens.device)
        for i, tok in enumerate(marker):
            m &= (tokens[:, i:n - k + 1 + i] == tok) & ok[:, i:n - k + 1 + i]
        hits[:, :n - k + 1] |= m
    return hits


def predict_length(
    x0: torch.Tensor,
    conf: torch.Tensor,
    scan: torch.Tensor,
    offset: int,
    length: torch.Tensor,
    markers: list[Marker],
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


def block_ends_request(block_tokens: torch.Tensor, done_block: torch.Tensor, markers: list[Marker]) -> torch.Tensor:
    """[B] True where the block just finished (``done_block``) holds an end marker."""
    return done_block & marker_hits(block_tokens, markers).any(1)
