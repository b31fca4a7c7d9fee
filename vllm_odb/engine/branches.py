"""Jump-share on vLLM's paged cache: draft branches as extra query rows of the decode step.

A jump-share engine schedules a wider canvas per request (``knobs.canvas_width``: ``ridge_rows``,
or ``2 * ridge_rows - window`` with Dream's shifted logits; models/hook.py): the first ``window`` rows are the base branch (the block, Dream: from the
position before it), the next rows the drafts of ``policies.jump.branch_layout``, the rest padding.
How one step runs, and who does what:

- the sampler plans the next step of each request from the branch it just adopted
  (``plan_jump``: draft budget from the live batch and the ridge point, top-p positions, the
  family of drafts, the layout) and writes the rows' tokens into the draft slots;
- ``ODBModelState.prepare_attn`` gives every row its position (block position of its window
  offset) and KV slot: base rows write their KV to the block's slots as in a plain step, draft
  and padding rows write nothing (slot -1);
- attention: the backend's kernel runs the whole batch as usual, which is exact for base rows
  (they see prompt + live canvas, block included). ``BranchAttention`` then recomputes the draft
  rows of each planned request with SDPA over [prefix | the window keys the mask allows | suffix]
  gathered from the paged cache plus the drafts' own keys from this step: the block-diagonal mask
  (a draft sees its own rows) with shared KV (a shared-layout draft reads the base branch's keys
  at offsets where it has no row), exactly the reference loop's mask;
- the sampler decides every branch from its rows' logits (``pred_row``), accepts by the chain
  rule (``policies.jump.accept``) and adopts the furthest verified draft.

Why this route (reasoned, not yet measured at full size): the base rows keep vLLM's paged-attention
kernel (and its speed); only the draft rows, a few per request below the ridge point, take the SDPA
side path, which reads the same paged cache and needs no kernel of ours. Its cost is a gather of
the request's keys and values per layer (prompt + canvas) and one masked SDPA call per planned
request. FlexAttention would need a block mask per step over paged keys and a compile per shape; a
kernel of ours is what would replace the SDPA gather if the speed benchmarks say it matters. The attention op runs outside CUDA graphs (PIECEWISE), so jump-share engines do not
capture FULL graphs; everything else in the layer stays graphed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vllm_odb.engine.refresh import kv_slots
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.jump import DraftBudget, branch_blocks, branch_layout, build_drafts, draft_family, plan_drafts


@dataclass
class JumpPlan:
    """One request's branches for its next decode step (all on the request's device)."""

    tokens: torch.Tensor  # [Q] ids of the real rows (base window first)
    offsets: torch.Tensor  # [Q] window offset of each row (position = block start - shift + offset)
    attn: torch.Tensor  # [Q, Q] bool, row q may attend to new row k (policies.jump.branch_layout)
    pred_row: torch.Tensor  # [1 + D, K] the row whose logits predict block slot t in each branch
    blocks: torch.Tensor  # [1 + D, K] each branch's block tokens
    positions: torch.Tensor  # [p] drafted block slots
    drafted: torch.Tensor  # [p] drafted tokens
    family: torch.Tensor  # [D, p] which drafted slots each draft fills
    window: int  # base rows

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


def plan_jump(block: torch.Tensor, before: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor,
              mask_id: int, cfg: DecodeConfig, num_live: int, shift: int, max_rows: int) -> JumpPlan | None:
    """The branches of one request's next step, or None when the budget leaves no draft.

    ``block`` [K]: the block after this step's commits; ``before`` [shift]: the token(s) before it
    (Dream's window starts there); ``x0``/``conf`` [K]: the adopted branch's predictions;
    ``num_live``: requests decoding in the batch (they share ``cfg.ridge_rows``)."""
    masked = block == mask_id
    window = block.shape[0] + shift
    budget = DraftBudget(cfg.ridge_rows, cfg.max_draft_positions)
    p_row, shared = plan_drafts(budget, num_live, window, masked.sum()[None])
    p = int(p_row[0])
    if p == 0:
        return None
    positions, drafted = build_drafts(x0[None], conf[None], masked[None], p)
    family = draft_family(p, device=block.device)
    blocks = branch_blocks(block[None], positions, drafted, family)  # [1, 1 + D, K]
    nb = blocks.shape[1]
    win = torch.cat([before[None, None].expand(1, nb, shift), blocks], 2) if shift else blocks
    valid = torch.ones((1, family.shape[0]), dtype=torch.bool, device=block.device)
    lay = branch_layout(win, valid, shared, masked[None], shift)
    q = int(lay.num_rows[0])
    if q > max_rows:  # the budget is below the canvas width by construction; guard anyway
        return None
    return JumpPlan(tokens=lay.tokens[0, :q], offsets=lay.offset[0, :q], attn=lay.attn[0, :q, :q],
                    pred_row=lay.pred_row[0], blocks=blocks[0], positions=positions[0], drafted=drafted[0],
                    family=family, window=window)


@dataclass
class BranchRows:
    """A planned request in this step's batch, for ``BranchAttention``."""

    first: int  # first token row of the request in the batch
    plan: JumpPlan
    q0: int  # position of window offset 0
    end: int  # prompt + live canvas
    block_table: torch.Tensor  # the request's block table row (kernel blocks)


class BranchAttention:
    """Wraps an attention impl's ``forward``: the kernel for every row, then SDPA for draft rows.

    ``rows`` is set by the model state for each step (empty: the kernel alone)."""

    def __init__(self, forward, kernel_block_size_of):
        self.forward = forward
        self.rows: list[BranchRows] = []
        self.kernel_block_size_of = kernel_block_size_of

    def __call__(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = self.forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if not self.rows or attn_metadata is None:
            return out
        heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_size
        q_all = query.view(query.shape[0], heads, dim)
        k_all = key.view(key.shape[0], kv_heads, dim)
        v_all = value.view(value.shape[0], kv_heads, dim)
        out_rows = output.view(output.shape[0], heads * dim)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(dim, dim=-1)  # [blocks, N, H, d]
        kbs = self.kernel_block_size_of()
        for r in self.rows:
            plan = r.plan
            w, q = plan.window, plan.num_rows
            if q == w:
                continue
            pos = torch.arange(r.end, device=query.device)
            slots = kv_slots(r.block_table, pos, kbs)
            k_cache = key_cache[slots // kbs, slots % kbs]  # [end, H, d]
            v_cache = value_cache[slots // kbs, slots % kbs]
            keys = torch.cat([k_cache, k_all[r.first + w: r.first + q]], 0)
            vals = torch.cat([v_cache, v_all[r.first + w: r.first + q]], 0)
            # Draft rows: prefix and suffix always; window position q0 + o where the mask lets the
            # row read base row o; draft keys where the mask lets it read that draft row.
            mask = torch.ones((q - w, r.end + q - w), dtype=torch.bool, device=query.device)
            mask[:, r.q0:r.q0 + w] = plan.attn[w:, :w]
            mask[:, r.end:] = plan.attn[w:, w:]
            o = F.scaled_dot_product_attention(
                q_all[r.first + w: r.first + q].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                vals.transpose(0, 1)[None], attn_mask=mask[None, None], scale=layer.impl.scale,
                enable_gqa=heads != kv_heads)
            out_rows[r.first + w: r.first + q] = o[0].transpose(0, 1).reshape(q - w, heads * dim).to(out_rows.dtype)
        return out
