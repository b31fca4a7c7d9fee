"""Streaming-dLLM's attenuation-guided suffix pruning: which canvas positions a block sees.

Attention from the current block to the all-mask suffix decays with distance, except for the
final canvas position. So a block's forwards keep, after the block, only the next ``window``
canvas positions plus the final position, which keeps its true position id (RoPE then still sees
the full canvas length). When the window reaches the end of the canvas nothing is pruned.
Everything before the block (prompt, decoded blocks) is kept.
"""

from __future__ import annotations

import torch


def window_stop(block_end: int, length: int, window: int) -> int:
    """End (exclusive) of the kept window after a block ending at ``block_end``, on a canvas of
    ``length``; the final position ``length - 1`` is kept besides when the window stops short of it."""
    return min(block_end + window, length)


def pruned_suffix(first: torch.Tensor, block_start: int, block_end: int, length: torch.Tensor,
                  window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids and key validity of the slots a pruned block sees from its start on.

    ``first`` [B]: position id of canvas column 0 per request (prompts are left-padded);
    ``block_start``/``block_end``: the block's canvas columns [start, end); ``length`` [B]: each
    request's live canvas length. Returns ``pos`` and ``valid`` [B, N]: the canvas columns
    [start, min(end + window, max length)) (the block and the window; valid inside the request's
    canvas), then, if some request's canvas continues past the window, one slot holding each
    request's final position ``first + length - 1``, valid for requests whose final position lies
    past the window. Every kept slot after the block is still masked.
    """
    end = int(length.max())
    stop = window_stop(block_end, end, window)
    cols = torch.arange(block_start, stop, device=first.device)
    pos = first[:, None] + cols[None]
    valid = cols[None] < length[:, None]
    if stop < end:
        pos = torch.cat([pos, (first + length - 1)[:, None]], 1)
        valid = torch.cat([valid, (length > stop)[:, None]], 1)
    return pos, valid
