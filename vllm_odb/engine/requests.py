"""Per-request decoding state of the vLLM engine, indexed by the runner's request slot.

Host side: each request's ``DecodeConfig``, end markers, prompt length, live canvas, current block
and the state machine the sampler drives (engine/sampler.py), one method a transition:

    added --(prefill done)--> refresh --> decoding the block: forwarded() after each decode step
      ^                                     |  jump-share: plan holds the next step's branches
      |                                     v
      +---------- refreshed() <---- complete_block(): the block goes out; True -> the next block
                                            |  starts with a refresh (cut() may shrink the canvas)
                                            +-- False -> finished: EOS blocks until vLLM stops it

    any state --(its step unusable: non-finite logits, or its own part of the step raised)-->
      failed (RequestTable.fail): nothing more goes out; the sampler reports it every step until
      vLLM's scheduler ends it with an error (patches/request_errors.py)

GPU side: ``tokens[slot]`` = prompt, committed blocks and the canvas still being decoded (masks
where undecided), the sequence the refresh forward reads and the draft slots are cut from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from vllm_odb.engine import CHECK, check, faults, kv_release
from vllm_odb.engine.knobs import (REPLAY_ARG, canvas_width, live_gen_length, request_config, request_forcing,
                                   step_width)
from vllm_odb.engine.metrics import COUNTERS, RequestCounters
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.adaptive import BlockThresholds, moving_thresholds
from vllm_odb.policies.forcing import Forcing
from vllm_odb.policies.host import to_device
from vllm_odb.policies.jump import BranchLayout, Branches
from vllm_odb.policies.length import Marker, Markers
from vllm_odb.policies.step import plan_branches
from vllm_odb.policies.streaming import window_stop

log = logging.getLogger(__name__)


@dataclass
class JumpPlan:
    """One request's branches for its next decode step (``policies.step.plan_branches`` for a
    batch of one, laid out in a fixed number of rows) and the query rows they take in its canvas
    (all on the request's device, nothing read back): the first ``window`` rows are the base
    branch (the block; Dream: from the position before it), then the valid drafts' rows, then
    padding up to ``num_rows``. A plan whose drafts are all invalid (too few masks, no room) is
    its base branch alone: the step a plan-less request takes."""

    branches: Branches  # blocks, drafted positions and tokens, family (batch of one)
    tokens: torch.Tensor  # [Q] ids of the rows (base window first)
    offsets: torch.Tensor  # [Q] window offset of each row (position = block start - shift + offset)
    attn: torch.Tensor  # [Q, Q] bool, row q may attend to new row k (policies.jump.branch_layout)
    pred_row: torch.Tensor  # [1 + D, K] the row whose logits predict block slot t in each branch
    drafts: torch.Tensor  # [] real draft rows (after the window; on the device)
    window: int  # base rows
    num_rows: int  # Q: the rows it lays out, padding included (a host number)

    @classmethod
    def plan(cls, block: torch.Tensor, before: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, mask_id: int,
             cfg: DecodeConfig, num_live: int, rows: int) -> "JumpPlan | None":
        """The branches of the next step of ``block`` [K] (``before`` [shift]: the tokens before
        it; ``x0``/``conf`` [K]: the adopted branch's predictions) in ``rows`` query rows, or None
        when the draft budget of ``num_live`` requests leaves no block a draft."""
        return cls.plan_many(block[None], before[None], x0[None], conf[None], mask_id, cfg, num_live, rows)[0]

    @classmethod
    def plan_many(cls, block: torch.Tensor, before: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, mask_id: int,
                  cfg: DecodeConfig, num_live: int, rows: int) -> list["JumpPlan | None"]:
        """``plan`` for G requests of one knob set at once (``block`` [G, K], ``before`` [G, shift],
        ``x0``/``conf`` [G, K]): one ``plan_branches`` call, no device read. Each plan decides as
        ``plan_branches`` would for its request alone (see there: the family is the largest the
        budget allows, the drafts past the request's own count invalid)."""
        masked = block == mask_id
        br = plan_branches(block, before, x0, conf, masked, cfg, num_live, drafts_only=True, rows=rows)
        if br is None:
            return [None] * block.shape[0]
        lay, window = br.layout, block.shape[1] + before.shape[1]
        drafts = lay.num_rows - window
        plans: list[JumpPlan | None] = []
        for g in range(block.shape[0]):
            one = slice(g, g + 1)
            sub = Branches(br.blocks[one], br.positions[one], br.drafted[one], br.family, br.valid[one],
                           BranchLayout(lay.tokens[one], lay.offset[one], lay.branch[one], lay.attn[one],
                                        lay.pred_row[one], lay.num_rows[one]))
            plans.append(cls(sub, lay.tokens[g], lay.offset[g], lay.attn[g], lay.pred_row[g], drafts[g], window, rows))
        return plans


@dataclass
class ODBRequest:
    req_id: str
    cfg: DecodeConfig
    prompt_len: int
    gen: int  # live canvas length (tokens), whole blocks
    start: int  # first position of the current block
    markers: Markers = ()  # end markers: the checkpoint's end ids and the request's stop strings
    finished: bool = False  # canvas done or ended early: emits EOS blocks until vLLM stops it
    warmup: bool = False  # vLLM's warm-up or a request refused here: not counted in the metrics
    counted: bool = False  # its stats went to the metrics (when it finished, or when removed)
    plan: JumpPlan | None = None  # jump-share: the branches of its next decode step
    forcing: Forcing | None = None  # benchmarks: a trace's decisions (policies/forcing.py); None when serving
    error: str | None = None  # why its step failed (RequestTable.fail); it then ends with an error
    fault: faults.Fault | None = None  # debug fault injection (engine/faults.py); None when serving
    block_step: int = 0  # forwards taken in the current block
    # Masks left in the current block after its last settled decode step (the host's view: under
    # overlap one step late); None at a block's start. With one left, the next step completes it.
    masks_left: int | None = None
    thresholds: BlockThresholds | None = None  # APD / dynamic thresholds of the current block
    # Per-request counters, named as in engine/metrics.py (forwards = NFE).
    stats: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))

    @property
    def end(self) -> int:
        return self.prompt_len + self.gen

    def kept(self) -> tuple[int, int | None]:
        """Streaming-dLLM's suffix pruning (``suffix_window``) for the current block, as in
        policies.streaming.pruned_suffix: its forwards see positions ``[0, stop)`` (the block and the
        next ``suffix_window`` canvas positions) and, where the canvas goes on past them, the final
        position ``end - 1`` at its true position id. Returns ``(stop, final)``; without pruning
        ``(end, None)``. The refresh writes the final position's keys and values (rotated at its
        own position) into the cache slot of position ``stop``, so a step's keys are the contiguous
        slots ``[0, keys)``."""
        w = self.cfg.suffix_window
        if not w:
            return self.end, None
        stop = window_stop(self.start + self.cfg.block_length, self.end, w)
        return stop, (self.end - 1 if stop < self.end else None)

    @property
    def keys(self) -> int:
        """Cache slots a step of the current block attends: ``[0, keys)``."""
        stop, final = self.kept()
        return stop + (final is not None)

    def suffix_cols(self) -> list[int]:
        """Canvas positions after the block that the current block's steps see."""
        stop, final = self.kept()
        return list(range(self.start + self.cfg.block_length, stop)) + ([] if final is None else [final])

    @property
    def forwards_taken(self) -> int:
        """Forwards the request took so far (refreshes and decode steps, idle ones included)."""
        return self.stats["forwards"] + self.stats["idle_forwards"]

    @property
    def block_index(self) -> int:
        return (self.start - self.prompt_len) // self.cfg.block_length

    # ---- transitions (the sampler calls these; module doc) -----------------------------------
    def refreshed(self, mask_id: int, graphed: bool = False) -> None:
        """A refresh forward over the request's ``keys`` starts its block: counted as a forward
        (it takes the block's first step; ``graphed``: it replayed CUDA graphs); APD's
        per-position state starts over."""
        self.stats["forwards"] += 1
        self.stats["refreshes"] += 1
        self.stats["refresh_tokens"] += self.keys
        if graphed:
            self.stats["refresh_graph_tokens"] += self.keys
        self.thresholds = BlockThresholds(self.cfg, mask_id) if moving_thresholds(self.cfg) else None

    def cut(self, gen: int) -> bool:
        """ALP at the refresh left a canvas of ``gen`` tokens (never longer). Returns whether it shrank."""
        shrank = gen < self.gen
        self.gen = min(self.gen, gen)
        self.stats["canvas_predicted"] = self.gen
        return shrank

    def stepped(self) -> None:
        """A forward decided the block (its refresh, or a decode step)."""
        self.block_step += 1

    def forwarded(self, decided: bool, accepted: int) -> None:
        """A decode step ran on the block (it decided if the block had masks; ``accepted``:
        drafted tokens adopted). Its plan was already cleared or replaced when the step's
        decisions were made (the sampler plans the next step then, on the device, before this is
        known): this never touches it."""
        self.stepped()
        self.stats["forwards" if decided else "idle_forwards"] += 1
        self.stats["drafts_accepted"] += accepted

    def stops(self, has_end: bool) -> bool:
        """Decoding ends after this block: it completes an end marker with ``early_stop`` (or a
        trace ends here: ``has_end`` is then the trace's)."""
        return has_end and (self.cfg.early_stop or self.forcing is not None)

    def complete_block(self, stop: bool) -> bool:
        """The current block is decoded and goes out. Returns whether decoding goes on (the next
        block starts with a refresh); False: the canvas is done, ``stop`` ends it early, or the
        request had finished already."""
        if not self.finished:
            self.stats["tokens"] += self.cfg.block_length
        self.start += self.cfg.block_length
        self.block_step = 0
        self.masks_left = None
        self.plan = None  # planned for the block that went out; the refresh plans the next one
        return not (self.finished or self.start >= self.end or stop)


class StopMarkers:
    """Each request's stop strings as end markers: token ids from the model's tokenizer (as the
    reference does: ``tokenizer(s, add_special_tokens=False)``), loaded on first use. Without one
    (``skip_tokenizer_init``, or it fails to load) a request's markers are the checkpoint's end ids."""

    def __init__(self, load: Callable[[], object | None] | None):
        self._load = load
        self._tokenizer = None
        self._cache: dict[str, Marker] = {}

    def __call__(self, stop) -> Markers:
        strings = [stop] if isinstance(stop, str) else list(stop or [])
        if not strings or self._load is None:
            return ()
        if self._tokenizer is None:
            try:
                self._tokenizer = self._load()
            except Exception as e:  # a tokenizer that cannot load must not take the engine down
                log.warning("vllm-odb: no tokenizer for stop strings (%s); they end requests in vLLM only", e)
            if self._tokenizer is None:
                self._load = None
                return ()
        for s in strings:
            if s not in self._cache:
                self._cache[s] = tuple(self._tokenizer(s, add_special_tokens=False)["input_ids"])
        return tuple(self._cache[s] for s in strings if s and self._cache[s])


class RequestTable:
    def __init__(self, max_num_reqs: int, max_model_len: int, engine: DecodeConfig, shift: int,
                 mask_id: int, eos_id: int, markers: list[Marker], device,
                 counters: RequestCounters | None = None, tokenizer: Callable[[], object | None] | None = None):
        """``markers``: the checkpoint's end markers (every request's); ``tokenizer`` loads the
        model's tokenizer for the requests' stop strings (None: no tokenizer)."""
        self.counters = counters or RequestCounters(enabled=False)
        self.engine = engine
        self.block = engine.block_length
        self.shift = shift
        self.window = engine.block_length + shift  # the base branch's query rows
        self.width = canvas_width(engine, shift)  # query rows of a decode step (vLLM's canvas)
        self.max_model_len = max_model_len
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.markers: Markers = tuple(tuple(m) for m in markers)
        self.stop_markers = StopMarkers(tokenizer)
        self.device = device
        self._aranges: dict[int, torch.Tensor] = {}
        # + one block of room past max_model_len for EOS fill after the last block
        self.tokens = torch.full((max_num_reqs, max_model_len + self.width + self.block), mask_id,
                                 dtype=torch.long, device=device)
        self.reqs: list[ODBRequest | None] = [None] * max_num_reqs
        self.slot_of: dict[str, int] = {}
        # Slots whose request failed (RequestTable.fail), until it leaves; slots whose request
        # carries a debug fault (engine/faults.py; always empty unless enabled).
        self.failed: set[int] = set()
        self.faulty: set[int] = set()
        # Per slot: the request's last refresh produced non-finite logits. Read with the next
        # decode step's flags (engine/sampler.py), so the refresh adds no host sync.
        self.unusable = torch.zeros(max_num_reqs, dtype=torch.bool, device=device)
        self.ends = 0  # requests whose decoding ended (finish, or an end marker vLLM stops on), ever

    def add(self, slot: int, req_id: str, prompt_ids: list[int], prefill_ids: list[int] | None,
            sampling_params) -> ODBRequest:
        """A new request, or one resumed after preemption (its committed blocks come back as part of
        ``prefill_ids``; decoding continues with the next block)."""
        self.remove(req_id)
        sp = sampling_params
        warmup = req_id.startswith("_warmup_")  # vLLM's kernel warm-up: run the path, decode nothing
        forcing, markers, fault = None, self.markers, None
        try:
            extra = getattr(sp, "extra_args", None)
            cfg = self.engine if warmup else request_config(
                self.engine, extra, getattr(sp, "temperature", 0.0), getattr(sp, "max_tokens", None))
            forcing = None if warmup else request_forcing((extra or {}).get(REPLAY_ARG))
            fault = None if warmup else faults.request_fault(extra)
            markers = markers if warmup else markers + self.stop_markers(getattr(sp, "stop", None))
        except ValueError as e:  # validated in the front end (patches/diffusion_params.py); never
            log.error("request %s: %s; it ends without output", req_id, e)  # crash the engine
            cfg, warmup = self.engine, True
        plen = len(prompt_ids)
        ids = list(prefill_ids) if prefill_ids else list(prompt_ids)
        gen = live_gen_length(cfg, plen, self.max_model_len, self.width - self.block)
        req = ODBRequest(req_id=req_id, cfg=cfg, prompt_len=plen, gen=gen, start=len(ids), markers=markers,
                         warmup=warmup, forcing=forcing, fault=fault)
        req.stats["canvas_requested"] = req.stats["canvas_predicted"] = gen
        row = self.tokens[slot]
        row.fill_(self.mask_id)
        row[: len(ids)] = to_device(ids, self.device)
        self.reqs[slot] = req
        self.slot_of[req_id] = slot
        self.failed.discard(slot)
        self.unusable[slot] = False
        if fault is not None:
            self.faulty.add(slot)
        if CHECK:
            check.HISTORY.log(req_id, f"added at slot {slot}: prompt {plen}, prefill {len(ids)}, canvas end {req.end}"
                                      f"{' (warm-up or refused)' if warmup else ''}")
        if warmup or req.start >= req.end:
            self.finish(slot)
        return req

    def remove(self, req_id: str) -> None:
        """The request left the batch (finished, aborted or preempted)."""
        slot = self.slot_of.pop(req_id, None)
        kv_release.forget(req_id)
        if CHECK and slot is not None:
            check.HISTORY.log(req_id, f"removed from slot {slot}")
        if slot is not None:
            self._count(self.reqs[slot])
            self.reqs[slot] = None
            self.failed.discard(slot)
            self.faulty.discard(slot)

    def _count(self, req: ODBRequest) -> None:
        if not (req.warmup or req.counted):
            req.counted = True
            self.counters.add(req.stats)

    def idle(self) -> bool:
        """No request is still decoding (all ended or emitting their final EOS block)."""
        return all(r is None or r.finished for r in self.reqs)

    def finish(self, slot: int) -> None:
        """No more decoding: the canvas from the current block on reads EOS, so the next step
        commits EOS and vLLM stops the request."""
        req = self.reqs[slot]
        self.ends += not req.finished  # (a finished request commits EOS blocks, each finishing it again)
        req.finished = True
        req.plan = None
        self.tokens[slot, req.start:] = self.eos_id
        self._count(req)  # its decoding is over; an aborted request is counted when removed

    def fail(self, slot: int, reason: str) -> None:
        """The request's step cannot be used (``reason``): it decodes and emits nothing more, and
        the sampler reports it until vLLM's scheduler ends it with an error (engine/sampler.py,
        patches/request_errors.py). The other requests go on."""
        req = self.reqs[slot]
        log.error("vllm-odb: request %s failed: %s; it ends with an error", req.req_id, reason)
        req.error = reason
        req.finished = True
        req.plan = None
        self.failed.add(slot)
        self.faulty.discard(slot)
        self._count(req)
        if CHECK:
            check.HISTORY.log(req.req_id, f"failed: {reason}")

    def ended(self, slot: int) -> None:
        """The request emitted a block holding an end marker, on which vLLM stops it: its stats go
        to the metrics now (vLLM's removal reaches the worker only at the next step, which may be
        long after). Forwards it still takes (``ignore_eos``) are not counted."""
        self.ends += not self.reqs[slot].counted  # once a request (``ignore_eos``: end markers in later blocks)
        self._count(self.reqs[slot])

    def get(self, slot: int) -> ODBRequest | None:
        return self.reqs[slot] if 0 <= slot < len(self.reqs) else None

    def block_cols(self, reqs: list[ODBRequest], context: int = 0) -> torch.Tensor:
        """[R, context + block] token columns of each request's current block, with ``context``
        columns before it (they may reach into the prompt)."""
        starts = to_device([q.start - context for q in reqs], self.device)
        return starts[:, None] + self.arange(context + self.block)[None]

    def rows_needed(self, slot: int) -> int:
        """Query rows the request in ``slot`` lays out in its next decode step: its jump-share
        plan's, or the window (an unknown slot: the window)."""
        q = self.reqs[slot]
        return self.window if q is None or q.plan is None else q.plan.num_rows

    def step_width(self, batch: int) -> int:
        """Rows each decode request gets in the step after a step of ``batch`` requests
        (``knobs.step_width``): what the next step's plans may lay out."""
        return step_width(self.engine, self.shift, batch)

    def arange(self, n: int) -> torch.Tensor:
        """``torch.arange(n)`` on the table's device, made once per length (a step's column
        ranges; read-only)."""
        t = self._aranges.get(n)
        if t is None:
            t = self._aranges[n] = torch.arange(n, device=self.device)
        return t


def decode_rows(input_batch, table: "RequestTable") -> np.ndarray:
    """Batch rows that run a decode step: a request of the table (its slot holds the row's request:
    not a dummy row of vLLM's) that is not prefilling and was scheduled at least the rows its step
    lays out (``RequestTable.rows_needed``). A jump-share engine's step width follows the batch
    (``knobs.step_width``), so a row may hold more (padding); a window the scheduler cut short
    (token budget, ``max_model_len``) holds fewer and decides nothing."""
    n = input_batch.num_reqs
    rows = []
    for r in np.flatnonzero(~input_batch.is_prefilling_np[:n]):
        slot = int(input_batch.idx_mapping_np[r])
        q = table.reqs[slot]
        if q is not None and q.req_id == input_batch.req_ids[r] \
                and input_batch.num_scheduled_tokens[r] >= table.rows_needed(slot):
            rows.append(r)
    return np.array(rows, dtype=np.int64)


def fit_plans(input_batch, table: "RequestTable") -> None:
    """Jump-share: a decode row scheduled its window but fewer slots than its plan lays out (the
    scheduler cut it short, or the batch grew since the plan) decodes its window this step, without
    drafts (the plan's first ``window`` rows are the window: its input ids stand). Kept, its plan
    would leave the row undecided, and vLLM's own positions would write draft-row keys over the
    dual cache's suffix, every step the batch stays as large."""
    n = input_batch.num_reqs
    for r in np.flatnonzero(~input_batch.is_prefilling_np[:n]):
        q = table.reqs[int(input_batch.idx_mapping_np[r])]
        if q is not None and q.plan is not None and q.req_id == input_batch.req_ids[r] \
                and table.window <= input_batch.num_scheduled_tokens[r] < q.plan.num_rows:
            q.plan = None
