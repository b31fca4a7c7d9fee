"""Streaming-dLLM's suffix pruning in the reference loop: the sequence each block decodes on."""

from __future__ import annotations

import torch

from vllm_odb.policies.streaming import pruned_suffix


def suffix_view(x: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor, plen: int, s: int, e: int,
                length: torch.Tensor, window: int, mask_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, key mask) of the pruned sequence for the block at columns [s, e): columns
    [0, s) of the current sequence (prompt and decoded blocks, unchanged), then the block, the
    next ``window`` canvas positions and the final position (``policies.streaming``), all masked.

    The loop keeps working on this sequence: its block columns are the true ones, and after the
    last block (or an early exit) everything past the decoded blocks is still masked, so the
    canvas reads the same as an unpruned one."""
    first = key_mask[:, :plen].sum(1)  # position id of canvas column 0 (prompts are left-padded)
    spos, svalid = pruned_suffix(first, s - plen, e - plen, length, window)
    fill = torch.full(spos.shape, mask_id, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, :s], fill], 1), torch.cat([pos[:, :s], spos], 1), torch.cat([key_mask[:, :s], svalid], 1)
