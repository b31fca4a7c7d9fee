"""The reference generate loop: block-wise masked-diffusion decoding in plain PyTorch.

It is the oracle the vLLM engine is checked against and the research-code-equivalent baseline of
the benchmarks, so it stays plain. One step, top to bottom:

    forward: no cache | refresh (full forward, rebuilds the cache; ALP reads it) |
             cached step on the block | jump-share step (block + drafts as extra query rows)
      -> logits of the block's canvas positions (Dream: from the position before, see below)
      -> policy decides (policies.decide; jump-share: per branch, then policies.jump.accept)
      -> the new block state

After a block: early termination if it holds an end marker. Batches: prompts are left-padded;
padded keys are masked and positions count real tokens only, so a request decodes the same alone
and in a batch. A request whose canvas ALP cut shorter has the keys past its end masked (the
tensor is cut at the longest live canvas). Dream predicts token i from position i-1, so for Dream
a cached step's query window starts one position before the block.

Streaming-dLLM and Dynamic-dLLM: with ``suffix_window`` each block decodes on a pruned sequence
(reference/streaming.py); the step's threshold comes from policies.adaptive (dynamic threshold,
APD), reset at every block; with ``dcu`` the uncached forward is reference/dcu.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_odb.checkpoint import SpecialTokens
from vllm_odb.policies import DecodeConfig, decide, dream_quota, linear_quota, predict
from vllm_odb.policies.adaptive import BlockThresholds, streaming_threshold
from vllm_odb.policies.confidence import drop_token
from vllm_odb.policies.jump import (
    DraftBudget,
    accept,
    branch_blocks,
    branch_layout,
    build_drafts,
    draft_family,
    plan_drafts,
)
from vllm_odb.policies.length import Marker, marker_hits, predict_length
from vllm_odb.policies.replay import Recorder, Replay, forced_commit
from vllm_odb.reference.dcu import DCUForward
from vllm_odb.reference.model import DiffusionLM
from vllm_odb.reference.streaming import suffix_view

log = logging.getLogger(__name__)


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # each request's canvas (gen_length ids; EOS after an early stop / cut)
    nfe: list[int]  # forwards each request took part in
    forwards: int  # forwards of the batch
    stats: dict = field(default_factory=dict)  # per-request lists, see generate()


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and real-token mask, prompts aligned to the right."""
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[i, width - len(p):] = True
    return ids, real


def end_markers(special: SpecialTokens, stop: list[list[int]] | None = None) -> list[Marker]:
    """End-of-response markers: the checkpoint's end ids and the request's tokenized stop strings."""
    return [(e,) for e in special.end_ids] + [tuple(s) for s in (stop or []) if s]


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    special: SpecialTokens,
    generator: torch.Generator | None = None,
    on_forward: Callable[[], None] | None = None,
    stop: list[list[int]] | None = None,
    replay: list[Replay] | None = None,
    record: bool = False,
) -> GenerateOutput:
    """Decode ``prompts`` (token ids) with ``cfg``. ``stop``: tokenized stop strings (ALP and
    early termination treat them as end markers, like EOS and end-of-turn).

    ``stats`` holds per request: ``canvas_length`` (after ALP), ``refresh_tokens`` (tokens the
    refresh forwards processed), ``drafted_accepted`` (drafted tokens adopted), ``query_rows``
    (query rows of the request's cached forwards), ``cached_forwards``; with ``record``, ``trace``
    (each request's ``policies.replay.Replay`` as a dict). ``replay``: one trace per prompt, forced
    onto this model (commit counts, canvas cuts, the last block; see policies/replay.py)."""
    device = next(model.parameters()).device
    mask_id = special.mask_id
    shift = model.spec.logits_shift
    prompt_ids, prompt_real = left_pad(prompts, special.pad_id, device)
    batch, plen = prompt_ids.shape
    glen, blen = cfg.gen_length, cfg.block_length
    if plen + glen > model.spec.max_position:
        raise ValueError(f"prompt ({plen}) + gen_length ({glen}) exceeds the model's max_position ({model.spec.max_position})")
    markers = end_markers(special, stop)
    if model.attention_impl == "research":
        extra = [k for k, on in (("jump-share (ridge_rows)", cfg.jump), ("suffix_window", cfg.suffix_window),
                                 ("dcu", cfg.dcu)) if on]
        if extra:
            raise ValueError(f'attention_impl="research" models the research code\'s cache (no cache, prefix, '
                             f'dual); {", ".join(extra)} runs with attention_impl="plain"')
    jump = cfg.jump
    if jump and cfg.temperature > 0:
        log.warning("jump-share verification is greedy; speculation is off at temperature %s", cfg.temperature)
        jump = False
    budget = DraftBudget(cfg.ridge_rows, cfg.max_draft_positions)

    x = torch.cat([prompt_ids, torch.full((batch, glen), mask_id, dtype=torch.long, device=device)], 1)
    key_mask = torch.cat([prompt_real, torch.ones((batch, glen), dtype=torch.bool, device=device)], 1)
    pos = (key_mask.long().cumsum(1) - 1).clamp_min(0)
    length = torch.full((batch,), glen, dtype=torch.long, device=device)  # live canvas per request
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    refresh_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    drafted = torch.zeros(batch, dtype=torch.long, device=device)
    query_rows = torch.zeros(batch, dtype=torch.long, device=device)
    cached_forwards = torch.zeros(batch, dtype=torch.long, device=device)
    forwards = 0
    cols = torch.arange(glen, device=device)
    dcu = DCUForward(model, cfg, plen, mask_id) if cfg.dcu else None  # Dynamic-dLLM's uncached forward
    if replay is not None and len(replay) != batch:
        raise ValueError(f"replay holds {len(replay)} traces for {batch} prompts")
    recorder = Recorder(batch) if record else None

    for b in range(cfg.num_blocks):
        done |= b * blen >= length
        if bool(done.all()):
            break
        live = ~done
        if recorder:
            recorder.block(live, length)
        s, e = plen + b * blen, plen + (b + 1) * blen
        q0 = s - shift  # first query row of a cached step (Dream reads the block from one earlier)
        if cfg.suffix_window:  # Streaming-dLLM: this block sees the next suffix_window positions + the last
            x, pos, key_mask = suffix_view(x, pos, key_mask, plen, s, e, length, cfg.suffix_window, mask_id)
        masked = (x[:, s:e] == mask_id) & live[:, None]
        quota = linear_quota(masked.sum(1), cfg.steps_per_block) if cfg.schedule == "linear" else None
        thresholds = BlockThresholds(cfg, mask_id)  # dynamic / APD thresholds, reset every block
        cache = None
        adopted = None  # (x0, conf) of the branch adopted last: jump-share drafts come from it
        step = 0
        while masked.any():
            if cfg.rule == "quota" and step >= cfg.steps_per_block:
                raise RuntimeError("quota schedule ended with masked positions left")
            n_live = int(masked.any(1).sum())
            new_block = None
            if cfg.cache == "none":
                logits = (dcu(x, pos, key_mask, masked.any(1)) if dcu else model(x, pos, key_mask))[:, q0:e - shift]
            elif step == 0:  # refresh: one full forward rebuilds the cache and takes the first step
                logits_all, kv = model(x, pos, key_mask, return_kv=True)
                refresh_tokens += torch.where(live, key_mask.sum(1), 0)
                if cfg.alp:
                    x0_all, conf_all = predict(drop_token(logits_all[:, s - shift:x.shape[1] - shift], mask_id))
                    scan = (x[:, s:] == mask_id) & key_mask[:, s:] & live[:, None]
                    if replay:  # the recorded cut (the canvas predictions above are ALP's cost)
                        new_length = torch.tensor([r.length(b, int(n)) for r, n in zip(replay, length)], device=device)
                    else:
                        new_length = predict_length(x0_all, conf_all, scan, b * blen, length, markers,
                                                    cfg.alp_threshold, blen, cfg.alp_min_length)
                    length = torch.where(live, new_length, length)
                    if recorder:
                        recorder.set_lengths(live, length)
                    key_mask[:, plen:] &= cols[None, :x.shape[1] - plen] < length[:, None]
                    keep = plen + int(length.max())
                    x, key_mask, pos = x[:, :keep], key_mask[:, :keep], pos[:, :keep]
                    kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in kv]
                logits = logits_all[:, q0:e - shift]
                cache = kv if cfg.cache == "dual" else [(k[:, :, :q0], v[:, :, :q0]) for k, v in kv]
            elif jump and adopted is not None:
                new_block, adopted, rows, accepted = _jump_step(
                    model, x, pos, key_mask, cache, s, e, shift, masked, adopted, budget, n_live, cfg, mask_id,
                    _counts(replay, b, step, device))
                query_rows += torch.where(masked.any(1), rows, 0)
                drafted += torch.where(masked.any(1), accepted, 0)
                cached_forwards += masked.any(1)
            elif cfg.cache == "dual":  # block rows only; prefix and suffix keys from the cache
                logits = model(x[:, q0:e], pos[:, q0:e], key_mask, past=cache, splice=(q0, e))[:, :blen]
            else:  # prefix cache: block and suffix rows against the cached prefix
                logits = model(x[:, q0:], pos[:, q0:], key_mask, past=cache)[:, :blen]
            if cfg.cache != "none" and step > 0 and new_block is None:
                query_rows += torch.where(masked.any(1), (e if cfg.cache == "dual" else x.shape[1]) - q0, 0)
                cached_forwards += masked.any(1)
            forwards += 1
            if on_forward is not None:
                on_forward()
            nfe += masked.any(1)
            if new_block is None:
                if cfg.rule == "quota":
                    step_quota = quota[:, step] if quota is not None else torch.full(
                        (batch,), dream_quota(masked.sum().item() / batch, step, cfg.steps_per_block), device=device)
                else:
                    step_quota = None
                x0, conf, commit = decide(logits, masked, cfg, mask_id, step_quota, generator,
                                          thresholds.step(logits, x[:, s:], key_mask[:, s:]))
                if replay:
                    commit = forced_commit(conf, masked, _counts(replay, b, step, device))
                new_block = torch.where(commit, x0, x[:, s:e])
                adopted = (x0, conf)
            x[:, s:e] = torch.where(masked.any(1, keepdim=True), new_block, x[:, s:e])
            before, masked = masked, (x[:, s:e] == mask_id) & live[:, None]
            if recorder:
                recorder.step(before, masked)
            step += 1
        if replay:  # decoding ends where the trace did
            done |= live & torch.tensor([r.last(b) for r in replay], device=device)
        elif cfg.early_stop:
            done |= live & marker_hits(x[:, plen:e], markers).any(1)

    canvas = x[:, plen:]
    canvas = torch.where(canvas == mask_id, special.eos_id, canvas)  # never decoded: cut or stopped early
    canvas = torch.cat([canvas, torch.full((batch, glen - canvas.shape[1]), special.eos_id, device=device)], 1)
    stats = {
        "canvas_length": length.tolist(),
        "refresh_tokens": refresh_tokens.tolist(),
        "drafted_accepted": drafted.tolist(),
        "query_rows": query_rows.tolist(),
        "cached_forwards": cached_forwards.tolist(),
        **(dcu.stats() if dcu else {}),
        **({"trace": recorder.traces()} if recorder else {}),
    }
    return GenerateOutput(tokens=canvas.tolist(), nfe=nfe.tolist(), forwards=forwards, stats=stats)


def _counts(replay: list[Replay] | None, block: int, step: int, device) -> torch.Tensor | None:
    """Replay: each request's recorded commits for this forward."""
    if not replay:
        return None
    return torch.tensor([r.count(block, step) for r in replay], device=device)


def _jump_step(model, x, pos, key_mask, cache, s, e, shift, masked, adopted, budget, n_live, cfg, mask_id,
               forced=None):
    """One jump-share forward: the base block plus drafts as extra query rows over the dual cache.
    Returns the adopted block, the adopted branch's (x0, conf), query rows and drafted tokens
    accepted per request."""
    batch, blen = masked.shape
    q0 = s - shift
    window = blen + shift
    p_row, shared = plan_drafts(budget, n_live, window, masked.sum(1))
    p = int(p_row.max())
    block = x[:, s:e]
    family = draft_family(p, device=x.device)
    positions, tokens = build_drafts(adopted[0], adopted[1], masked, max(p, 1))
    positions, tokens = positions[:, :p], tokens[:, :p]
    draft_valid = ~(family[None] & (torch.arange(p, device=x.device)[None, None] >= p_row[:, None, None])).any(2)
    blocks = branch_blocks(block, positions, tokens, family)  # [B, 1 + D, K]
    nb = blocks.shape[1]
    win = torch.cat([x[:, q0:s, None].expand(-1, -1, nb).transpose(1, 2), blocks], 2) if shift else blocks
    lay = branch_layout(win, draft_valid, shared, masked, shift)
    q = lay.tokens.shape[1]
    q_pos = pos[:, q0:e].gather(1, lay.offset)
    real = lay.branch >= 0
    keys = torch.cat([key_mask[:, :q0], real, key_mask[:, e:]], 1)
    attn = torch.ones((batch, q, keys.shape[1]), dtype=torch.bool, device=x.device)
    attn[:, :, q0:q0 + q] = lay.attn
    logits = model(lay.tokens, q_pos, keys, past=cache, splice=(q0, e), attn_mask=attn)
    idx = lay.pred_row.reshape(batch, -1)  # [B, (1 + D) * K]
    br_logits = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1])).view(batch, nb, blen, -1)
    br_masked = (blocks == mask_id) & masked.any(1)[:, None, None]
    # Streaming's dynamic threshold per branch: each branch's own block plus the suffix.
    sfx, sfx_valid = x[:, None, e:].expand(-1, nb, -1), key_mask[:, None, e:].expand(-1, nb, -1)
    thr = streaming_threshold(cfg, torch.cat([blocks, sfx], 2), torch.cat([torch.ones_like(br_masked), sfx_valid], 2),
                              mask_id)
    x0, conf, commit = decide(br_logits.view(batch * nb, blen, -1), br_masked.view(batch * nb, blen), cfg, mask_id,
                              threshold=None if thr is None else thr.reshape(-1))
    x0, conf, commit = (t.view(batch, nb, blen) for t in (x0, conf, commit))
    choice = accept(commit, x0, positions, tokens, family, draft_valid) if p > 0 and forced is None else torch.zeros(
        batch, dtype=torch.long, device=x.device)
    if forced is not None:  # replay: the recorded commits land on the base branch
        commit[:, 0] = forced_commit(conf[:, 0], br_masked[:, 0], forced)
    pick = choice[:, None, None].expand(-1, 1, blen)
    chosen_block = blocks.gather(1, pick)[:, 0]
    chosen_commit = commit.gather(1, pick)[:, 0]
    chosen_x0, chosen_conf = x0.gather(1, pick)[:, 0], conf.gather(1, pick)[:, 0]
    new_block = torch.where(chosen_commit, chosen_x0, chosen_block)
    sizes = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), family.sum(1)])
    return new_block, (chosen_x0, chosen_conf), lay.num_rows, sizes[choice]


def response_ids(canvas: list[int], special: SpecialTokens) -> list[int]:
    """The response: the canvas up to (not including) the first end-of-sequence id."""
    ends = set(special.end_ids)
    for i, t in enumerate(canvas):
        if t in ends:
            return canvas[:i]
    return canvas
