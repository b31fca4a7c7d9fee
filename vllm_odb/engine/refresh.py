"""The Fast-dLLM cache refresh on vLLM's paged KV cache.

At the start of every block, Fast-dLLM runs one full forward over prompt + committed tokens +
the whole masked canvas: it rewrites the KV of every position (the committed prefix now sees the
tokens decoded since, and the masked suffix gets the keys the dual cache attends to) and its
logits take the block's first decoding step.

vLLM has no API to rewrite KV below ``num_computed_tokens``. The two candidates were a scheduler
rewind (``num_computed_tokens`` back to 0 for one step, which re-schedules the whole sequence
through the scheduler's token budget and needs the scheduler, the GPU-side counters and async
scheduling's placeholders to agree on a negative step) and a side forward run by the engine
itself. We run the side forward, from the sampler, right after the step that finished the
previous block (or the prompt's prefill): its logits give the block's first step, so a block
costs what it costs the research code, with two known extras: vLLM's own prefill forward over the
prompt is redone by the first refresh, and a block the refresh step already completes is committed
by one more (idle) canvas forward, since a step can commit one block only. It needs no scheduler change, and leaves vLLM's bookkeeping untouched: the
positions it rewrites are ones vLLM already considers computed, or the canvas, which the next
step's query overwrites anyway. What it gives up: the scheduler does not budget refresh tokens
(a step with refreshes takes longer than its scheduled tokens suggest), and pipeline parallelism
is unsupported (the side forward runs all layers on one rank).

The side forward is ``DiffusionLMModel.refresh_forward``: the model's own layers with ``attend``
below in place of paged attention. ``attend`` writes each layer's keys and values into the
request's paged-cache slots with the attention backend's own cache-update op, then attends each
sequence bidirectionally with SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kv_slots(block_table_row: torch.Tensor, positions: torch.Tensor, kernel_block_size: int) -> torch.Tensor:
    """Paged-cache slot of each position, from one request's block table (kernel-block units)."""
    return (block_table_row[positions // kernel_block_size].long() * kernel_block_size
            + positions % kernel_block_size)


class DenseAttend:
    """``attend`` for ``refresh_forward``: the sequences are concatenated; ``bounds`` [(a, b)]."""

    def __init__(self, bounds: list[tuple[int, int]], slots: torch.Tensor):
        self.bounds = bounds
        self.slots = slots

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> torch.Tensor:
        n = q.shape[0]
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_size
        k3, v3 = k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)
        attn.impl.do_kv_cache_update(attn, k3, v3, attn.kv_cache, self.slots)
        q3 = q.view(n, heads, dim)
        out = torch.empty((n, heads * dim), dtype=q.dtype, device=q.device)
        for a, b in self.bounds:
            o = F.scaled_dot_product_attention(
                q3[a:b].transpose(0, 1)[None], k3[a:b].transpose(0, 1)[None], v3[a:b].transpose(0, 1)[None],
                scale=attn.impl.scale, enable_gqa=heads != kv_heads)
            out[a:b] = o[0].transpose(0, 1).reshape(b - a, heads * dim)
        return out


def refresh(model, tokens: torch.Tensor, jobs: list[tuple], block_tables: torch.Tensor,
            kernel_block_size: int, shift: int) -> tuple[torch.Tensor, list[int]]:
    """Run the refresh forward for ``jobs`` = [(slot, batch_row, length, block_start[, final])]:
    sequence ``tokens[slot, :length]`` at positions 0..length-1, KV written through
    ``block_tables[batch_row]``. ``final`` (Streaming-dLLM's suffix pruning, engine/requests.py
    ``ODBRequest.kept``): one more token, ``tokens[slot, final]`` at position id ``final``, whose
    keys and values go to the cache slot of position ``length``. Returns the final hidden states
    of all jobs, concatenated, and each job's first row in them. Row ``offset + p`` is position p
    (p < length); with Dream's shift its logits predict position p + 1."""
    device = tokens.device
    ids, pos, slots, bounds, offsets = [], [], [], [], []
    offset = 0
    for slot, row, length, _start, *rest in jobs:
        final = rest[0] if rest else None
        p = torch.arange(length, device=device)
        ids.append(tokens[slot, :length])
        pos.append(p)
        slots.append(kv_slots(block_tables[row], p, kernel_block_size))
        n = length
        if final is not None:
            ids.append(tokens[slot, final:final + 1])
            pos.append(torch.full((1,), final, device=device))
            slots.append(kv_slots(block_tables[row], torch.full((1,), length, device=device), kernel_block_size))
            n += 1
        bounds.append((offset, offset + n))
        offsets.append(offset)
        offset += n
    hidden = model.model.refresh_forward(torch.cat(ids), torch.cat(pos), DenseAttend(bounds, torch.cat(slots)))
    return hidden, offsets
