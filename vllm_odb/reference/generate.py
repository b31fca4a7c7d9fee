"""The reference generate loop: block-wise masked-diffusion decoding in plain PyTorch.

It is the oracle the vLLM engine is checked against and the research-code-equivalent baseline of
the benchmarks, so it stays plain. One step, top to bottom (``_Decoder.block``):

    forward: no cache | refresh (full forward, rebuilds the cache; ALP cuts the canvas from its
             predictions, policies.step.cut_canvas) | cached step on the block |
             jump-share step (policies.step.plan_branches: block + drafts as extra query rows)
      -> logits of the block's canvas positions (Dream: from the position before, see below)
      -> policy: policies.step.block_step (decide, forced counts, commit);
                 jump-share: policies.step.branch_step (every branch, then accept)
      -> the new block state

After a block: early termination if it completes an end marker (policies.step.block_ends).
Batches: prompts are left-padded; padded keys are masked and positions count real tokens only, so
a request decodes the same alone and in a batch. A request whose canvas ALP cut shorter has the
keys past its end masked (the tensor is cut at the longest live canvas). Dream predicts token i
from position i-1, so for Dream a cached step's query window starts one position before the block.

Streaming-dLLM and Dynamic-dLLM: with ``suffix_window`` each block decodes on a pruned sequence
(reference/streaming.py); the step's threshold comes from policies.adaptive (dynamic threshold,
APD), reset at every block; with ``dcu`` the uncached forward is reference/dcu.py's.

Benchmarks attach through two hooks, None otherwise: ``forcing`` (one per request,
policies/forcing.py: a trace's commit counts, canvas cuts and last block; bench/replay.py) and a
step ``observer`` (bench/replay.py's ``Recorder``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_odb.checkpoint import SpecialTokens
from vllm_odb.policies import DecodeConfig, dream_quota, linear_quota
from vllm_odb.policies.adaptive import BlockThresholds
from vllm_odb.policies.forcing import Forcing, forced_counts, forced_ends, forced_lengths
from vllm_odb.policies.jump import Branches
from vllm_odb.policies.length import Markers, canvas_predictions
from vllm_odb.policies.step import Step, block_ends, block_step, branch_step, cut_canvas, plan_branches
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


def end_markers(special: SpecialTokens, stop: list[list[int]] | None = None) -> Markers:
    """End-of-response markers: the checkpoint's end ids and the request's tokenized stop strings."""
    return tuple((e,) for e in special.end_ids) + tuple(tuple(s) for s in (stop or []) if s)


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    special: SpecialTokens,
    generator: torch.Generator | None = None,
    on_forward: Callable[[], None] | None = None,
    stop: list[list[int]] | None = None,
    forcing: list[Forcing] | None = None,
    observer=None,
) -> GenerateOutput:
    """Decode ``prompts`` (token ids) with ``cfg``. ``stop``: tokenized stop strings (ALP and
    early termination treat them as end markers, like EOS and end-of-turn).

    ``stats`` holds per request: ``canvas_length`` (after ALP), ``refresh_tokens`` (tokens the
    refresh forwards processed), ``drafted_accepted`` (drafted tokens adopted), ``query_rows``
    (query rows of the request's cached forwards), ``cached_forwards``. Benchmarks' hooks:
    ``forcing``, one ``policies.forcing.Forcing`` per prompt (a trace forced onto this model);
    ``observer``, told of each block's start (``block``), its ALP cut (``set_lengths``) and every
    forward (``step``): bench/replay.py's ``generate_traced`` uses both."""
    device = next(model.parameters()).device
    batch = _Batch.start(prompts, cfg, special, device)
    if batch.plen + cfg.gen_length > model.spec.max_position:
        raise ValueError(f"prompt ({batch.plen}) + gen_length ({cfg.gen_length}) exceeds the model's "
                         f"max_position ({model.spec.max_position})")
    if forcing is not None and len(forcing) != len(prompts):
        raise ValueError(f"replay holds {len(forcing)} traces for {len(prompts)} prompts")
    if model.forward_override is not None:  # a benchmark's forward may not cover every config
        model.forward_override.check(cfg)
    decoder = _Decoder(model, cfg, special, batch, end_markers(special, stop), generator, on_forward,
                       forcing, observer)
    for b in range(cfg.num_blocks):
        batch.done |= b * cfg.block_length >= batch.length
        if bool(batch.done.all()):
            break
        decoder.block(b, ~batch.done)
    return batch.output(cfg, special, decoder.dcu)


@dataclass
class _Batch:
    """The loop's state: the sequence (left-padded prompts, then the canvas), its key mask and
    positions, each request's live canvas and whether it is done, and the per-request counters."""

    x: torch.Tensor
    key_mask: torch.Tensor
    pos: torch.Tensor
    plen: int
    length: torch.Tensor  # live canvas per request
    done: torch.Tensor
    nfe: torch.Tensor
    refresh_tokens: torch.Tensor
    drafted: torch.Tensor
    query_rows: torch.Tensor
    cached_forwards: torch.Tensor
    forwards: int = 0

    @classmethod
    def start(cls, prompts: list[list[int]], cfg: DecodeConfig, special: SpecialTokens, device) -> "_Batch":
        prompt_ids, prompt_real = left_pad(prompts, special.pad_id, device)
        n, glen = len(prompts), cfg.gen_length
        x = torch.cat([prompt_ids, torch.full((n, glen), special.mask_id, dtype=torch.long, device=device)], 1)
        key_mask = torch.cat([prompt_real, torch.ones((n, glen), dtype=torch.bool, device=device)], 1)
        zeros = [torch.zeros(n, dtype=torch.long, device=device) for _ in range(5)]
        return cls(x, key_mask, (key_mask.long().cumsum(1) - 1).clamp_min(0), prompt_ids.shape[1],
                   torch.full((n,), glen, dtype=torch.long, device=device),
                   torch.zeros(n, dtype=torch.bool, device=device), *zeros)

    def output(self, cfg: DecodeConfig, special: SpecialTokens, dcu: DCUForward | None) -> GenerateOutput:
        canvas = self.x[:, self.plen:]
        canvas = torch.where(canvas == special.mask_id, special.eos_id, canvas)  # never decoded: cut or stopped
        fill = torch.full((canvas.shape[0], cfg.gen_length - canvas.shape[1]), special.eos_id, device=canvas.device)
        stats = {
            "canvas_length": self.length.tolist(),
            "refresh_tokens": self.refresh_tokens.tolist(),
            "drafted_accepted": self.drafted.tolist(),
            "query_rows": self.query_rows.tolist(),
            "cached_forwards": self.cached_forwards.tolist(),
            **(dcu.stats() if dcu else {}),
        }
        return GenerateOutput(tokens=torch.cat([canvas, fill], 1).tolist(), nfe=self.nfe.tolist(),
                              forwards=self.forwards, stats=stats)


class _Decoder:
    """One block at a time: forward, policy, state update (module doc)."""

    def __init__(self, model, cfg, special, batch: _Batch, markers: Markers, generator, on_forward, forcing,
                 observer):
        self.model, self.cfg, self.batch, self.markers = model, cfg, batch, markers
        self.mask_id, self.shift = special.mask_id, model.spec.logits_shift
        self.generator, self.on_forward, self.observer = generator, on_forward, observer
        self.forcing = forcing or [None] * batch.x.shape[0]
        self.dcu = DCUForward(model, cfg, batch.plen, self.mask_id) if cfg.dcu else None
        self.jump = cfg.jump
        if self.jump and cfg.temperature > 0:
            log.warning("jump-share verification is greedy; speculation is off at temperature %s", cfg.temperature)
            self.jump = False

    def block(self, b: int, live: torch.Tensor) -> None:
        """Decode block ``b`` of the live requests, then early termination."""
        batch, cfg, mask_id = self.batch, self.cfg, self.mask_id
        n = batch.x.shape[0]
        if self.observer:
            self.observer.block(live, batch.length)
        s, e = batch.plen + b * cfg.block_length, batch.plen + (b + 1) * cfg.block_length
        if cfg.suffix_window:  # Streaming-dLLM: this block sees the next suffix_window positions + the last
            batch.x, batch.pos, batch.key_mask = suffix_view(batch.x, batch.pos, batch.key_mask, batch.plen, s, e,
                                                             batch.length, cfg.suffix_window, mask_id)
        masked = (batch.x[:, s:e] == mask_id) & live[:, None]
        quota = linear_quota(masked.sum(1), cfg.steps_per_block) if cfg.schedule == "linear" else None
        thresholds = BlockThresholds(cfg, mask_id)  # dynamic / APD thresholds, reset every block
        cache, adopted, step = None, None, 0  # adopted: the last step's, jump-share drafts from it
        while masked.any():
            if cfg.rule == "quota" and step >= cfg.steps_per_block:
                raise RuntimeError("quota schedule ended with masked positions left")
            forced = forced_counts(self.forcing, [b] * n, [step] * n, batch.x.device)
            if self.jump and adopted is not None:  # the block and its drafts in one forward
                new = self._jump_step(s, e, masked, adopted, cache, forced)
            else:
                logits, cache = self._forward(b, s, e, step, masked, cache, live)
                new = block_step(logits, batch.x[:, s:e], masked, cfg, mask_id, self._quota(quota, step, masked),
                                 self.generator, thresholds.step(logits, batch.x[:, s:], batch.key_mask[:, s:]),
                                 forced)
            batch.forwards += 1
            if self.on_forward is not None:
                self.on_forward()
            batch.nfe += masked.any(1)
            batch.x[:, s:e] = torch.where(masked.any(1, keepdim=True), new.block, batch.x[:, s:e])
            adopted = (new.x0, new.conf)
            before, masked = masked, (batch.x[:, s:e] == mask_id) & live[:, None]
            if self.observer:
                self.observer.step(before, masked)
            step += 1
        if cfg.early_stop or any(f is not None for f in self.forcing):  # forced: where the trace ended
            ends = block_ends(batch.x[:, batch.plen:e], [self.markers] * n,
                              forced_ends(self.forcing, [b] * n, batch.x.device))
            batch.done |= live & ends

    def _quota(self, quota, step: int, masked: torch.Tensor) -> torch.Tensor | None:
        """The quota rule's commits this step: the linear schedule's, or Dream's from the batch."""
        if self.cfg.rule != "quota":
            return None
        if quota is not None:
            return quota[:, step]
        n = masked.shape[0]
        k = dream_quota(masked.sum().item() / n, step, self.cfg.steps_per_block)
        return torch.full((n,), k, device=masked.device)

    def _forward(self, b: int, s: int, e: int, step: int, masked, cache, live):
        """The step's forward (no cache | refresh | cached step): the logits of the block's
        positions, and the cache for the block's later steps."""
        batch, cfg, model, shift = self.batch, self.cfg, self.model, self.shift
        q0 = s - shift  # first query row of a cached step (Dream reads the block from one earlier)
        if cfg.cache == "none":
            full = self.dcu(batch.x, batch.pos, batch.key_mask, masked.any(1)) if self.dcu else model(
                batch.x, batch.pos, batch.key_mask)
            return full[:, q0:e - shift], None
        if step == 0:
            return self._refresh(b, s, e, live)
        if cfg.cache == "dual":  # block rows only; prefix and suffix keys from the cache
            logits = model(batch.x[:, q0:e], batch.pos[:, q0:e], batch.key_mask, past=cache, splice=(q0, e))
            rows = e - q0
        else:  # prefix cache: block and suffix rows against the cached prefix
            logits = model(batch.x[:, q0:], batch.pos[:, q0:], batch.key_mask, past=cache)
            rows = batch.x.shape[1] - q0
        self._cached_forward(masked.any(1), rows)
        return logits[:, :cfg.block_length], cache

    def _refresh(self, b: int, s: int, e: int, live):
        """One full forward rebuilds the cache (ALP cuts the canvas from its predictions) and its
        block logits take the first step."""
        batch, cfg, shift = self.batch, self.cfg, self.shift
        logits_all, kv = self.model(batch.x, batch.pos, batch.key_mask, return_kv=True)
        batch.refresh_tokens += torch.where(live, batch.key_mask.sum(1), 0)
        if cfg.alp:
            keep = self._cut_canvas(b, s, logits_all, live)
            kv = [(k[:, :, :keep], v[:, :, :keep]) for k, v in kv]
        q0 = s - shift
        cache = kv if cfg.cache == "dual" else [(k[:, :, :q0], v[:, :, :q0]) for k, v in kv]
        return logits_all[:, q0:e - shift], cache

    def _cut_canvas(self, b: int, s: int, logits_all, live) -> int:
        """Adaptive length prediction over the refresh's canvas predictions; keys past each
        request's canvas are masked and the sequence is cut at the longest. Returns its width."""
        batch, cfg, mask_id = self.batch, self.cfg, self.mask_id
        n, plen = batch.x.shape[0], batch.plen
        x0, conf = canvas_predictions(logits_all[:, s - self.shift:batch.x.shape[1] - self.shift], mask_id)
        scan = (batch.x[:, s:] == mask_id) & batch.key_mask[:, s:] & live[:, None]
        forced = forced_lengths(self.forcing, [b] * n, batch.length, batch.x.device)
        new = cut_canvas(x0, conf, scan, b * cfg.block_length, batch.length, self.markers, cfg, forced)
        batch.length = torch.where(live, new, batch.length)
        if self.observer:
            self.observer.set_lengths(live, batch.length)
        cols = torch.arange(batch.x.shape[1] - plen, device=batch.x.device)
        batch.key_mask[:, plen:] &= cols[None] < batch.length[:, None]
        keep = plen + int(batch.length.max())
        batch.x, batch.key_mask, batch.pos = batch.x[:, :keep], batch.key_mask[:, :keep], batch.pos[:, :keep]
        return keep

    def _jump_step(self, s: int, e: int, masked, adopted, cache, forced) -> Step:
        """One jump-share step: drafts planned from the adopted branch, every branch in one forward
        over the dual cache, the furthest verified branch adopted."""
        batch, cfg = self.batch, self.cfg
        active = masked.any(1)
        branches = plan_branches(batch.x[:, s:e], batch.x[:, s - self.shift:s], adopted[0], adopted[1], masked, cfg,
                                 int(active.sum()))
        logits = branch_forward(self.model, batch.x, batch.pos, batch.key_mask, cache, s, e, branches)
        new = branch_step(logits, branches, active, cfg, self.mask_id,
                          suffix=(batch.x[:, e:], batch.key_mask[:, e:]), forced=forced)
        self._cached_forward(active, branches.layout.num_rows)
        batch.drafted += torch.where(active, new.accepted, 0)
        return new

    def _cached_forward(self, active: torch.Tensor, rows) -> None:
        self.batch.query_rows += torch.where(active, rows, 0)
        self.batch.cached_forwards += active


def branch_forward(model: DiffusionLM, x, pos, key_mask, cache, s: int, e: int, branches: Branches) -> torch.Tensor:
    """The forward of a jump-share step on the dual cache: every branch's query rows
    (``branches.layout``) against [prefix | the new rows the layout lets each row see | suffix].
    Returns each branch's logits of the block's positions [B, 1 + D, K, V] (through ``pred_row``:
    a shared-layout draft reads the base branch's rows where it has none)."""
    lay = branches.layout
    batch, k = x.shape[0], e - s
    q0 = s - model.spec.logits_shift
    q = lay.tokens.shape[1]
    keys = torch.cat([key_mask[:, :q0], lay.branch >= 0, key_mask[:, e:]], 1)
    attn = torch.ones((batch, q, keys.shape[1]), dtype=torch.bool, device=x.device)
    attn[:, :, q0:q0 + q] = lay.attn
    logits = model(lay.tokens, pos[:, q0:e].gather(1, lay.offset), keys, past=cache, splice=(q0, e), attn_mask=attn)
    idx = lay.pred_row.reshape(batch, -1)  # [B, (1 + D) * K]
    return logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1])).view(batch, -1, k, logits.shape[-1])


def response_ids(canvas: list[int], special: SpecialTokens) -> list[int]:
    """The response: the canvas up to (not including) the first end-of-sequence id."""
    ends = set(special.end_ids)
    for i, t in enumerate(canvas):
        if t in ends:
            return canvas[:i]
    return canvas
