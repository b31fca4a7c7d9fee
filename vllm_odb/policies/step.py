"""One denoising step's decisions, as both engines call them.

Each engine runs the forward its own way and hands the logits here; everything a step decides is
one of these functions, in the order a step takes them:

- ``block_step``: decide (``decide``: predictions, confidences, the commit rule), the optional
  forced counts of a benchmark's trace (policies/forcing.py), the commit -> the new block;
- jump-share: ``plan_branches`` lays out the next step's drafts from the branch just adopted;
  ``branch_step`` decides every branch of a step and adopts the furthest verified one;
- at a refresh, ``cut_canvas``: adaptive length prediction (ALP) over the refresh's predictions;
- after a block, ``block_ends``: whether it completes an end marker (early termination).

The rules themselves live beside this file: commit.py (quota, threshold, factor), adaptive.py
(dynamic and APD thresholds), jump.py (drafts, layout, acceptance), length.py (end markers, ALP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_odb.policies.adaptive import streaming_threshold
from vllm_odb.policies.commit import commit_factor, commit_threshold, commit_topk
from vllm_odb.policies.confidence import drop_token, predict
from vllm_odb.policies.config import DecodeConfig
from vllm_odb.policies.forcing import force_commits
from vllm_odb.policies.jump import (
    Branches,
    DraftBudget,
    accept,
    branch_blocks,
    branch_layout,
    build_drafts,
    draft_family,
    fitting_drafts,
    plan_drafts,
    positions_bound,
)
from vllm_odb.policies.length import Marker, Markers, predict_length, row_marker_hits


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
    return x0, conf, commit_rule(conf, masked, cfg, quota, threshold)


def commit_rule(conf: torch.Tensor, masked: torch.Tensor, cfg: DecodeConfig, quota: torch.Tensor | None = None,
                threshold: torch.Tensor | None = None) -> torch.Tensor:
    """``decide``'s commit mask [B, N] from the confidences ``conf`` [B, N] (its arguments)."""
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
    return commit


@dataclass
class Step:
    """A step's outcome for a batch of blocks."""

    block: torch.Tensor  # [B, K] the block after the step's commits
    x0: torch.Tensor  # [B, K] the adopted branch's predictions (the next step's drafts come from them)
    conf: torch.Tensor  # [B, K] and their confidences
    accepted: torch.Tensor | None = None  # [B] drafted tokens adopted (branch steps)


def block_step(logits: torch.Tensor, block: torch.Tensor, masked: torch.Tensor, cfg: DecodeConfig, mask_id: int,
               quota: torch.Tensor | None = None, generator: torch.Generator | None = None,
               threshold: torch.Tensor | None = None, forced: torch.Tensor | None = None) -> Step:
    """One step of the plain decoders: ``decide`` on ``logits`` [B, K, V] of ``block`` [B, K]
    (``masked`` its undecided positions), then the forced counts (``forced`` [B], rows > 0: a
    trace's recorded number of commits, policies/forcing.py), then the commit."""
    x0, conf, commit = decide(logits, masked, cfg, mask_id, quota, generator, threshold)
    commit = force_commits(commit, conf, masked, forced)
    return Step(torch.where(commit, x0, block), x0, conf)


def plan_branches(block: torch.Tensor, before: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor,
                  masked: torch.Tensor, cfg: DecodeConfig, num_live: int, drafts_only: bool = False,
                  rows: int | None = None) -> Branches | None:
    """Jump-share: the branches of the next step of each block (policies/jump.py's rules in order).

    ``block`` [B, K] and its ``masked`` positions; ``before`` [B, shift]: the tokens before the
    block (Dream's query window starts there); ``x0``/``conf`` [B, K]: the predictions of the branch
    adopted last; ``num_live``: requests decoding in the batch (they share ``cfg.ridge_rows``).
    Each request drafts as many positions as its share of the budget allows (``valid`` masks the
    drafts of requests allowed fewer than the most), within its share of the rows (Dream's
    included: ``plan_drafts``); with none, the step is a plain one (with ``drafts_only``: None, and
    nothing else is planned).

    ``rows`` (the engine): every request's layout takes exactly ``rows`` query rows, and nothing is
    read from the device. The family is then the largest any block could draft
    (``positions_bound``), with the drafts past each request's own count invalid; a request whose
    drafts would take more rows has none (``fitting_drafts``: given fewer rows than its share).
    Where its drafts fit, its decisions are those of the plan without ``rows``: the family of p
    begins with the family of any smaller p, in the same order, and the top-p drafted positions
    begin with the top of any smaller count. ``rows`` must hold the base window. None (the
    reference): the family of the most positions any request drafts (a device read)."""
    shift = before.shape[1]
    window_rows = block.shape[1] + shift
    if rows is not None and rows < window_rows:
        raise ValueError(f"plan_branches: {rows} rows cannot hold the base window of {window_rows}")
    budget = DraftBudget(cfg.ridge_rows, cfg.max_draft_positions)
    p_row, shared = plan_drafts(budget, num_live, window_rows, masked.sum(1), 1 + shift)
    p = int(p_row.max()) if rows is None else positions_bound(budget, num_live, window_rows, block.shape[1])
    if p == 0 and drafts_only:
        return None
    family = draft_family(p, device=block.device)
    positions, drafted = build_drafts(x0, conf, masked, max(p, 1))
    positions, drafted = positions[:, :p], drafted[:, :p]
    too_far = torch.arange(p, device=block.device)[None, None] >= p_row[:, None, None]
    valid = ~(family[None] & too_far).any(2)
    own = None
    if rows is not None:
        valid, own = fitting_drafts(valid, shared, masked, shift, rows)
    blocks = branch_blocks(block, positions, drafted, family)  # [B, 1 + D, K]
    window = torch.cat([before[:, None].expand(-1, blocks.shape[1], -1), blocks], 2) if shift else blocks
    return Branches(blocks, positions, drafted, family, valid,
                    branch_layout(window, valid, shared, masked, shift, rows, own))


def branch_step(logits: torch.Tensor | None, branches: Branches, active: torch.Tensor, cfg: DecodeConfig,
                mask_id: int, suffix: tuple[torch.Tensor, torch.Tensor] | None = None,
                forced: torch.Tensor | None = None,
                preds: tuple[torch.Tensor, torch.Tensor] | None = None) -> Step:
    """One jump-share step: ``decide`` on every branch from ``logits`` [B, 1 + D, K, V] (each
    branch's rows, ``layout.pred_row``), then adopt the furthest verified draft
    (``policies.jump.accept``) with its own commits. ``preds`` (x0, conf) [B, 1 + D, K]: the
    predictions instead of the logits (greedy: the engine predicts each query row once, and
    gathers them through ``pred_row``; ``logits`` None). ``active`` [B]: blocks that still decide.
    ``suffix`` (tokens, valid) [B, S]: the canvas after the block that the step sees, for
    Streaming-dLLM's dynamic threshold per branch (its own block plus the suffix). ``forced`` [B]
    (every row forced): the recorded count commits on the base branch, which is adopted."""
    blocks = branches.blocks
    b, nb, k = blocks.shape
    masked = (blocks == mask_id) & active[:, None, None]
    threshold = None
    if suffix is not None:
        sfx, sfx_valid = (t[:, None].expand(-1, nb, -1) for t in suffix)
        threshold = streaming_threshold(cfg, torch.cat([blocks, sfx], 2),
                                        torch.cat([torch.ones_like(masked), sfx_valid], 2), mask_id)
    threshold = None if threshold is None else threshold.reshape(-1)
    if preds is None:
        x0, conf, commit = decide(logits.reshape(b * nb, k, -1), masked.view(b * nb, k), cfg, mask_id,
                                  threshold=threshold)
    else:
        if cfg.temperature > 0:
            raise ValueError("branch_step: predictions made once per row are greedy (temperature 0)")
        x0, conf = (t.reshape(b * nb, k) for t in preds)
        commit = commit_rule(conf, masked.view(b * nb, k), cfg, threshold=threshold)
    x0, conf, commit = (t.view(b, nb, k) for t in (x0, conf, commit))
    choice = torch.zeros(b, dtype=torch.long, device=blocks.device)
    if forced is not None:
        commit[:, 0] = force_commits(commit[:, 0], conf[:, 0], masked[:, 0], forced)
    elif branches.family.shape[0]:
        choice = accept(commit, x0, branches.positions, branches.drafted, branches.family, branches.valid)
    pick = choice[:, None, None].expand(-1, 1, k)
    chosen = [t.gather(1, pick)[:, 0] for t in (commit, x0, conf, blocks)]
    return Step(torch.where(chosen[0], chosen[1], chosen[3]), chosen[1], chosen[2], branches.sizes[choice])


def cut_canvas(x0: torch.Tensor, conf: torch.Tensor, scan: torch.Tensor, offset: int, length: torch.Tensor,
               markers: Sequence[Marker], cfg: DecodeConfig, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive length prediction at a refresh: the new live canvas [B] (never longer than
    ``length``), from the refresh's ``canvas_predictions`` (``x0``/``conf`` [B, N] of canvas
    positions offset.., ``scan``: still masked and live; policies.length.predict_length). Rows of
    ``forced`` >= 0 take the trace's cut instead."""
    new = predict_length(x0, conf, scan, offset, length, markers, cfg.alp_threshold, cfg.block_length,
                         cfg.alp_min_length)
    return new if forced is None else torch.where(forced >= 0, torch.minimum(forced, length), new)


def block_ends(tokens: torch.Tensor, markers: Sequence[Markers], forced: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """[B] the block just decoded ends its request: ``tokens`` [B, N], the canvas up to the block's
    end (at least the block and, before it, one token fewer than the longest marker; ``valid``:
    which columns are canvas), holds one of the row's end markers ``markers[b]``. With early
    termination every earlier block was checked, so only markers ending in this block can be new.
    Rows of ``forced`` >= 0 end where the trace did."""
    hits = row_marker_hits(tokens, markers, valid)
    return hits if forced is None else torch.where(forced >= 0, forced > 0, hits)
