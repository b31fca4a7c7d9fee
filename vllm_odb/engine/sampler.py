"""``ODBSampler``: one engine step of block-diffusion decoding on vLLM's V2 runner.

The runner hands over the logits of every decode request's query window (``width`` rows) after
each forward. One step, top to bottom (``_step``; the reference loop's order, policies shared):

    settle   (overlap) the last step's outcome per request, read on the host now: its decisions
             ran before this step's forward, so the host waits for them, not for the forward
    decode   each decode request's block logits (Dream: from the position before each slot)
             -> policies.step.block_step (decide, a trace's forced counts, commit) -> new block;
             a request with a jump-share plan: every branch's rows -> policies.step.branch_step
             (decide per branch, accept) -> the adopted branch's block; jump-share then plans
             the next step's branches from it (policies.step.plan_branches), on the device, in
             the rows the next step gives each request. The outcome (which blocks completed;
             policies.step.block_ends: which completed an end marker) goes to the host behind the
             step's kernels (``Outcome``), and is settled at the next step
    advance  per request, its state machine (engine/requests.py), on the settled outcome:
             not complete -> the block goes back as the next step's draft slots (num_sampled 0)
             complete     -> it goes out (num_sampled = block); the request is done if its canvas
                             is, or (early_stop) the block completed an end marker; else its next
                             block starts with a refresh
    refresh  those and the prompts whose prefill completes: one side forward over prompt + live
             canvas rewrites the cache (engine/model_state.py ``CacheRefresh``), its canvas
             predictions give ALP's new length (policies.step.cut_canvas), and its block logits
             take the next block's first step (block_step again)
    drafts   every touched request's next query rows go to vLLM's draft slots

Overlap (the default; ``VLLM_ODB_OVERLAP=0`` turns it off) is what keeps the GPU busy: the host
never waits for a forward, so vLLM schedules and prepares the next step while this one runs. Its
price: a completed block goes out one step later, and its request's forward in that step is idle
(counted in ``idle_forwards``, not in NFE); tokens and NFE are unchanged. Except where the step
is expected to complete the block of every request it decodes (each had one mask left after its
last settled step, or two in a step with drafts; about three blocks in four at real dynamics end
so): that step is read in the step, and its refreshes run at once (``VLLM_ODB_OVERLAP=always``
defers those too). Tokens stay the same either way; so does NFE, but for jump-share in a batch,
whose steps' draft shares follow the batch's timing. Jump-share overlaps too:
its plans never wait for an outcome. Each is laid out in the fixed number of rows the next step
gives its request, with the largest draft family the budget allows and the drafts past the
block's own count invalid (a block with fewer than two masks, or complete, plans its base branch
alone), so the host needs nothing of the step to lay it out (``JumpPlan``).

A block that the refresh step already completes is committed on the next step. A finished
request (canvas done, or an end marker with ``early_stop``) commits EOS blocks until vLLM's stop
check ends it.

One request's failure ends that request, not the engine. A step whose confidences are not finite
(its logits hold NaN or inf: a NaN confidence must never commit tokens) fails the request, found
when the step's outcome is read (a refresh's, with the next decode step's: ``RequestTable.unusable``),
before anything of it goes out; an
exception in a request's own part of the step (its state machine, planning, the refresh's checks:
``_own_part``) fails it too. A failed request emits nothing more, its slots are rejected, and the
step's ``SamplerOutput.num_nans`` marks its row, every step it is still in the batch: the scheduler
patch (patches/request_errors.py) finishes it with vLLM's ``FINISHED_ERROR``. What fails the batch
as a whole (the forward, a device error, the tensors of all requests) still raises: vLLM's engine
core dies, and the server's ``/health`` answers 503. ``VLLM_ODB_DEBUG_FAULTS`` (engine/faults.py)
injects such failures for the tests.

Logits are read in tiles over requests (``_TILE_BYTES`` of fp32 work each), so the sampler never
holds more than a bounded slice of [requests x block, vocab] in fp32 at once; jump-share's
planned rows are predicted untiled, at most the draft budget's rows a step (``ridge_rows``). With
overlap a decode step has no host sync, jump-share's included; ALP adds one per step with
refreshes: its cuts are read once the refresh's first steps and the jump-share plans are launched,
so those launches run behind the refresh on the device (before the first step of an ALP request
whose threshold reads the canvas length: Streaming's dynamic threshold, APD).

Benchmarks attach through hooks that are None when serving: a request's ``forcing`` (a trace,
policies/forcing.py) at the three forced decisions, and the step ``observer``
(``vllm_odb.engine.step_observer``), told when the refresh phase starts and when the step ends.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.output import SamplerOutput

from vllm_odb.engine import CHECK, check, faults, step_observer
from vllm_odb.engine.requests import JumpPlan, ODBRequest, RequestTable, decode_rows
from vllm_odb.policies.adaptive import moving_thresholds, streaming_threshold
from vllm_odb.policies.confidence import drop_token, predict
from vllm_odb.policies.forcing import forced_counts, forced_ends, forced_lengths
from vllm_odb.policies.host import to_device
from vllm_odb.policies.jump import Branches
from vllm_odb.policies.length import canvas_predictions
from vllm_odb.policies.step import Step, block_ends, block_step, branch_step, cut_canvas

log = logging.getLogger(__name__)
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)
_TILE_BYTES = 1 << 30  # fp32 bytes of [rows, vocab] decided at once (decide keeps ~4 copies)
_ALP_ROWS = 256  # canvas rows projected to the vocabulary at once for length prediction
# VLLM_ODB_REFRESH_TOKENS=n: refresh side forwards of up to n tokens instead of the runner's token
# budget (debugging: past the budget, a side forward may need memory vLLM's profile did not leave).
_REFRESH_TOKENS_ENV = "VLLM_ODB_REFRESH_TOKENS"
# VLLM_ODB_OVERLAP=0: read each decode step's outcome in the step itself (a host sync per step);
# "always": read every outcome at the next step, also of a step that must complete every block it
# decodes (the default reads those in the step: module doc).
OVERLAP_ENV = "VLLM_ODB_OVERLAP"
OVERLAP_VALUES = ("1", "0", "always")


@dataclass
class StepRows:
    """What each row of the runner's batch does this step."""

    slots: np.ndarray  # each row's request slot
    nlog: np.ndarray  # logit rows each row got
    decode: list[int]  # rows deciding a block: a full window of a request in the table
    partial: np.ndarray  # rows whose window the scheduler cut short: they decide nothing
    prefill: np.ndarray  # rows still prefilling their prompt (no logits)
    failed: list[int]  # rows of requests that failed (RequestTable.fail): they decide nothing

    @classmethod
    def of(cls, input_batch, table: RequestTable) -> "StepRows":
        n = input_batch.num_reqs
        slots = input_batch.idx_mapping_np[:n]
        if input_batch.num_draft_tokens == 0:  # an all-prefill batch: the runner gives each row
            nlog = np.zeros(n, dtype=np.int64)  # one logit (its last token), which we do not use
        else:
            nlog = np.diff(input_batch.cu_num_logits_np[: n + 1])
        # A decode step holds the rows its request lays out (the rows model_state set up; a
        # jump-share step may hold more: padding). The scheduler may give a running request fewer
        # slots (token budget, max_model_len): that step decides nothing and all its slots are
        # rejected, so vLLM's computed count stays where it was.
        full = decode_rows(input_batch, table)  # scheduled at least the rows each lays out
        full = full[nlog[full] >= input_batch.num_scheduled_tokens[full]]  # and the logits of them all
        failed = [r for r in range(n) if int(slots[r]) in table.failed] if table.failed else []
        decode = [int(r) for r in full if table.get(int(slots[r])) is not None and int(slots[r]) not in table.failed]
        return cls(slots, nlog, decode, np.setdiff1d(np.flatnonzero(nlog > 0), full),
                   np.flatnonzero((nlog == 0) & input_batch.is_prefilling_np[:n]), failed)

    def prefilled(self, input_batch, table: RequestTable) -> list[tuple[int, int]]:
        """(slot, row) of the prompts whose prefill completes this step: a refresh starts their first block."""
        jobs = []
        for r in self.prefill:
            req = table.get(int(self.slots[r]))
            done = (input_batch.num_computed_prefill_tokens_np[r] + input_batch.num_scheduled_tokens[r]
                    >= input_batch.prefill_len_np[r])
            if req is not None and done and not req.finished:
                jobs.append((int(self.slots[r]), int(r)))
        return jobs

    def touched(self, table: RequestTable, refreshed: list[tuple[int, int]]) -> list[int]:
        """Slots whose next query rows this step changed."""
        idle = {int(self.slots[r]) for r in np.flatnonzero(self.nlog == 0) if table.get(int(self.slots[r])) is not None}
        return sorted({int(self.slots[r]) for r in self.decode} | {s for s, _ in refreshed} | idle)


class StepOutput:
    """The step's ``SamplerOutput``. Fresh tensors every step: the runner copies them to the host
    on another stream (async output) and keeps only a reference, so a reused buffer could be
    overwritten by the next step before that copy reads it."""

    def __init__(self, n: int, width: int, block: int, device):
        self.width, self.block, self.device = width, block, device
        # one allocation (one kernel), three contiguous views, each starting 16-byte aligned (Triton
        # specialises its kernels on pointer alignment)
        a = -(-n * width // 4) * 4
        b = a + -(-n // 4) * 4
        flat = torch.zeros(b + n, dtype=torch.int32, device=device)
        self.sampled = flat[:n * width].view(n, width)
        self.num_sampled = flat[a:a + n]
        self.num_rejected = flat[b:b + n]
        self.num_nans = None  # rows of failed requests (> 0), for the scheduler; None: none
        self.emitted = False  # a block went out (it may end its request)

    def emit(self, rows: list[int], blocks: torch.Tensor) -> None:
        """Completed blocks [len(rows), block] go out in their rows' first slots."""
        if rows:
            r = to_device(rows, self.device)
            self.sampled[r, :self.block] = blocks.to(self.sampled.dtype)
            self.num_sampled[r] = self.block
            self.emitted = True

    def reject(self, rows: StepRows) -> None:
        """Slots vLLM must not count as computed: a decode row's past what it emitted (of the slots
        it was scheduled: the step's width), and every slot of a window the scheduler cut short."""
        if rows.decode:
            counts = rows.nlog[rows.decode]
            r = to_device(rows.decode, self.device)
            if (counts == counts[0]).all():  # one width for all: the usual step (widths differ only
                # in the step after the batch changed size, between rows scheduled before and after)
                self.num_rejected[r] = int(counts[0]) - self.num_sampled[r]
            else:
                self.num_rejected[r] = to_device(counts, self.device, self.num_rejected.dtype) - self.num_sampled[r]
        cut = np.union1d(rows.partial, np.asarray(rows.failed, dtype=np.int64)).astype(np.int64)
        if len(cut):
            self.num_rejected[to_device(cut, self.device)] = to_device(rows.nlog[cut], self.device,
                                                                       self.num_rejected.dtype)

    def report_failed(self, rows: list[int]) -> None:
        """Rows of failed requests: ``num_nans`` > 0 there (vLLM's per-request channel from the
        runner to the scheduler; patches/request_errors.py ends them with an error)."""
        self.num_nans = torch.zeros(len(self.num_sampled), dtype=torch.int32, device=self.device)
        self.num_nans[to_device(rows, self.device)] = 1

    def result(self) -> SamplerOutput:
        return SamplerOutput(sampled_token_ids=self.sampled, logprobs_tensors=None, num_nans=self.num_nans,
                             num_sampled=self.num_sampled, num_rejected=self.num_rejected)


class Outcome:
    """Decode steps' outcomes (``ODBSampler._flags`` rows) on their way to the host. ``later``
    starts the copy behind the step's kernels and returns at once; ``read`` (the next step) waits
    for that copy only."""

    def __init__(self, slots: list[int], reqs: list[ODBRequest], flags, ready=None):
        self.slots, self.reqs, self.flags, self.ready = slots, reqs, flags, ready

    @classmethod
    def later(cls, slots: list[int], reqs: list[ODBRequest], flags: torch.Tensor) -> "Outcome":
        if flags.device.type != "cuda":
            return cls(slots, reqs, flags)
        host = flags.to("cpu", non_blocking=True)  # pinned: the copy runs after the step's kernels
        ready = torch.cuda.Event()
        ready.record()
        return cls(slots, reqs, host, ready)

    @classmethod
    def now(cls, outcomes: list[tuple[int, ODBRequest, list]]) -> "Outcome":
        return cls([s for s, _, _ in outcomes], [q for _, q, _ in outcomes], [f for _, _, f in outcomes])

    def read(self) -> list[tuple[int, ODBRequest, list]]:
        if self.ready is not None:
            self.ready.synchronize()
        flags = self.flags.tolist() if isinstance(self.flags, torch.Tensor) else self.flags
        return list(zip(self.slots, self.reqs, flags))


@dataclass
class StepReport:
    """What a step did, for the step observer (read after the step)."""

    input_batch: object
    decoded: list[ODBRequest]  # the decode rows' requests
    refreshed: list[ODBRequest]  # the requests whose block started with a refresh
    ending: bool = False  # a request ended its decoding, or none is decoding: vLLM may stop stepping
    refresh_tokens: int = 0  # tokens the refresh forwards ran (before ALP cut any canvas they read)


class ODBSampler:
    def __init__(self, table: RequestTable, cache, base_sampler, max_num_tokens: int):
        """``cache``: the model state's ``CacheRefresh`` (the refresh side forward, its logits,
        the cache tail an ALP cut frees); ``base_sampler``: vLLM's, for its sampling states and
        the draft-token buffer the next step's query rows go to."""
        self.table = table
        self.cache = cache
        self.sampling_states = base_sampler.sampling_states
        self.req_states = base_sampler.req_states
        self.block, self.width, self.shift = table.block, table.width, table.shift
        self.device = table.device
        self._cols = torch.arange(self.block, device=self.device)
        # tokens per refresh side forward (VLLM_ODB_REFRESH_TOKENS: debugging override)
        self.refresh_budget = int(os.environ.get(_REFRESH_TOKENS_ENV) or max_num_tokens)
        if getattr(cache, "paged_forward", None) is not None:  # vLLM's compiled forward: its token range
            self.refresh_budget = min(self.refresh_budget, max_num_tokens)
        self.observer = step_observer()  # benchmarks' step profiler; None when serving
        self._refresh_tokens = 0  # this step's refresh forwards (StepReport)
        # This step's scheduled requests and, from them, the rows each decode request gets next
        # step (knobs.step_width: vLLM's scheduler gives the same): the jump-share plans' room.
        self.batch, self.next_width = 1, self.width
        # Overlap (the default): a decode step's outcome is read on the host at the next step, so the
        # host never waits for a forward and prepares the next step while it runs. A completed block
        # then goes out one step later; its request's forward in that step is idle, except after a
        # step expected to complete every block it decoded (_completes_every_block): read in the step.
        # Jump-share overlaps too: its plans are laid out on the device, without the step's outcome.
        overlap = os.environ.get(OVERLAP_ENV, "1").strip().lower() or "1"
        if overlap not in OVERLAP_VALUES:
            raise ValueError(f"{OVERLAP_ENV}={overlap!r}: give 1 (the default), 0 or always")
        self.overlap = overlap != "0"
        self.overlap_last = overlap == "always"  # defer a step that must complete its blocks, too
        self._pending: list[Outcome] = []

    # ---- the runner's sampler surface -------------------------------------------------------
    @property
    def penalties_state(self):
        return _NO_PENALTIES  # no penalties on the diffusion path; the runner reads this stub

    def add_request(self, req_idx: int, prompt_len: int, sampling_params) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()

    def __call__(self, logits: torch.Tensor, input_batch, draft_logits=None) -> SamplerOutput:
        try:
            return self._step(logits, input_batch)
        except Exception as e:
            # Under async scheduling vLLM runs the next step's forward before it reads this step's
            # result, so that forward's failure (this step's requests never advanced) is what it
            # reports. The cause goes to the log here, and (VLLM_ODB_CHECK) to each row's history.
            log.exception("vllm-odb: the sampler failed on a step of %d requests", input_batch.num_reqs)
            if CHECK:
                for r in range(input_batch.num_reqs):
                    check.HISTORY.log(input_batch.req_ids[r], f"sampler raised {type(e).__name__}: {e}")
            raise

    # ---- one step -----------------------------------------------------------------------------
    def _step(self, logits: torch.Tensor, input_batch) -> SamplerOutput:
        table = self.table
        ends = table.ends
        self.batch = max(1, input_batch.num_reqs)
        self.next_width = table.step_width(self.batch)
        rows = StepRows.of(input_batch, table)
        out = StepOutput(len(rows.slots), self.width, self.block, self.device)
        refresh: list[tuple[int, int]] = []  # (slot, batch row): a refresh starts their next block
        settled: set[int] = set()  # slots whose last step completed their block: no decision this step
        if self._pending:  # overlap: the last step's outcome, read while this step's forward runs
            refresh += self._settle(self._read_pending(rows), rows, out, settled, late=True)
        dec = [r for r in rows.decode
               if int(rows.slots[r]) not in settled and table.get(int(rows.slots[r])).error is None]
        slots = [int(rows.slots[r]) for r in dec]
        decoded = [table.get(s) for s in slots]
        if decoded:
            # requests whose step carries drafts (their plan's rows past the window: host numbers),
            # read before _plan_decoded replaces the plans with the next step's
            drafted = {id(q) for q in decoded if q.plan is not None and q.plan.num_rows > q.plan.window}
            masked, step, unusable = self._decode(logits, input_batch.cu_num_logits_np, dec, slots, decoded)
            flags = self._flags(slots, decoded, masked, step, unusable)
            # jump-share: the next step's branches from this one's, on the device, before its outcome
            # is known (a block this step completes plans no draft, and goes out before its plan runs)
            self._plan_decoded(slots, decoded, step)
            if self.overlap and (self.overlap_last or not self._completes_every_block(decoded, drafted)):
                # read at the next step (_read_pending): no host sync now
                self._pending.append(Outcome.later(slots, decoded, flags))
            else:  # the step's host sync
                refresh += self._settle([(s, q, f) for s, q, f in zip(slots, decoded, flags.tolist())], rows, out,
                                        settled)
            _checkpoint("decode")
        out.reject(rows)
        refresh += rows.prefilled(input_batch, table)
        if CHECK:
            _check_actions(input_batch, rows, refresh, out)
        if self.observer:
            self.observer.refresh_started()
        self._refresh_tokens = 0
        if refresh:
            self._refresh(refresh)
            _checkpoint("refresh")
        self._write_drafts(rows.touched(table, refresh))
        _checkpoint("drafts")
        if table.failed:  # failed earlier or in this step: the scheduler ends them with an error
            out.report_failed([r for r in range(len(rows.slots)) if int(rows.slots[r]) in table.failed])
        table.counters.flush(force=out.emitted or table.idle())  # blocks out may end requests: at once
        if self.observer:
            self.observer.step_ended(StepReport(input_batch, decoded, [table.get(s) for s, _ in refresh],
                                                table.ends != ends or (table.idle() and not self._pending),
                                                self._refresh_tokens))
        return out.result()

    @staticmethod
    def _completes_every_block(reqs: list[ODBRequest], drafted: set[int] = frozenset()) -> bool:
        """Whether this step is expected to complete the block of every request it decoded: each had
        one mask left after its last settled step (a step commits a token at least), or two where
        its step carried drafts (``drafted``: ids of those requests; the draft fills one: 74% of such
        jump-share steps completed their block on the v6 traces, against 2% of plain steps). Such a
        step is read in the step (a host sync): deferred, every request's forward in the next step
        would run its completed block again, idle (a whole forward at batch 1); read now, its
        refreshes run in this step. A wrong guess costs the sync only."""
        return bool(reqs) and all(q.masks_left is not None and q.masks_left <= (2 if id(q) in drafted else 1)
                                  for q in reqs)

    def _decode(self, logits, cu: np.ndarray, dec_rows: list[int], slot_list: list[int], reqs: list[ODBRequest]):
        """Decode: one policy step on every decode request's block (request ``slot_list[i]`` in
        batch row ``dec_rows[i]``; ``cu``: each row's first logit row), written back to the table.
        Returns the blocks' masked positions before the step, the step, and which requests'
        steps are unusable: a non-finite confidence (NaN or inf in their logits), in this step or
        in their last refresh's (``RequestTable.unusable``)."""
        table, blk = self.table, self.block
        slots = to_device(slot_list, self.device)
        cols = table.block_cols(reqs)
        block = table.tokens[slots[:, None], cols]  # [R, block]
        masked = block == table.mask_id
        # Logit rows 0..block-1 of each request's window predict its block slots (for Dream the
        # window starts one position early, so row j is position s-1+j and predicts slot j).
        first = to_device([int(cu[r]) for r in dec_rows], self.device)
        vocab = logits.shape[-1]
        if table.faulty:  # debug fault injection only (engine/faults.py)
            for i in self._faults_due(reqs):
                logits[int(cu[dec_rows[i]]): int(cu[dec_rows[i] + 1])] = float("nan")

        def block_logits(idx: torch.Tensor | None) -> torch.Tensor:  # None: every decode request
            rows = first if idx is None else first[idx]
            return logits[(rows[:, None] + self._cols[None]).reshape(-1)].view(len(rows), blk, vocab)

        step = self._block_steps(reqs, slots, block, masked, block_logits, max(1, _TILE_BYTES // (blk * vocab * 4)))
        self._branch_steps(logits, [int(cu[r]) for r in dec_rows], slot_list, reqs, masked, step)
        table.tokens[slots[:, None], cols] = step.block
        return masked, step, nonfinite_rows(step.conf) | table.unusable[slots]

    def _flags(self, slots: list[int], reqs: list[ODBRequest], masked: torch.Tensor, step: Step,
               unusable: torch.Tensor) -> torch.Tensor:
        """[R, 6] the decode step's outcome per request, on the device: block complete, it completed
        an end marker, the step decided (the block had masks), masks left, drafts accepted, unusable."""
        n_left = (step.block == self.table.mask_id).sum(1)
        ends = self._block_ends(reqs, slots, step.block)
        return torch.stack([n_left == 0, ends, masked.any(1), n_left, step.accepted, unusable], 1)

    def _read_pending(self, rows: StepRows) -> list[tuple[int, ODBRequest, list]]:
        """Overlap: the outcomes of earlier steps (``Outcome``), on the host. The last step's
        decisions ran before this step's forward, so the read waits for them only, not for the
        forward. A completed block goes out in its request's decode row; a request that has none
        this step (not scheduled, or cut short) keeps its outcome for a later step."""
        pending, self._pending = self._pending, []
        row_of = {int(rows.slots[r]) for r in rows.decode}
        ready = []
        for outcome in pending:
            for slot, q, f in outcome.read():
                if self.table.get(slot) is not q:  # it left (finished, aborted, preempted)
                    continue
                if f[0] and not f[5] and slot not in row_of:
                    self._pending.append(Outcome.now([(slot, q, f)]))
                else:
                    ready.append((slot, q, f))
        return ready

    def _settle(self, outcomes: list[tuple[int, ODBRequest, list]], rows: StepRows, out: StepOutput, settled: set[int],
                late: bool = False) -> list[tuple[int, int]]:
        """Each decode request after its step (engine/requests.py; ``outcomes``: (slot, request, its
        row of ``_flags``) on the host), then the completed blocks go out in this step's rows:
        read in the step itself, or (``late``: overlap) in the next one. Returns (slot, row) of the
        requests whose next block starts with a refresh; adds the slots whose blocks went out to
        ``settled``."""
        table = self.table
        row_of = {int(rows.slots[r]): int(r) for r in rows.decode}
        complete = [(slot, q) for slot, q, f in outcomes if f[0] and q.error is None and not f[5]]
        blocks = None
        if complete:  # the completed blocks, read before the requests move on to their next block
            idx = to_device([s for s, _ in complete], self.device)
            blocks = table.tokens[idx[:, None], table.block_cols([q for _, q in complete])]
        at = {s: i for i, (s, _) in enumerate(complete)}
        refresh, emit = [], []
        for slot, q, f in outcomes:
            if q.error is not None:  # failed in its decode step
                continue
            if f[5] and not q.finished:  # (a finished request's logits are not read)
                table.fail(slot, "non-finite logits (NaN or inf) in its forward")
                continue
            with self._own_part(slot, q):
                idle = late and bool(f[0])  # its forward this step ran the completed block again: no decision
                if idle:
                    settled.add(slot)
                done, again = self._advance_one(q, slot, f, idle)
                if done:
                    emit.append(slot)
                if again:
                    refresh.append((slot, row_of[slot]))
        if emit:
            out.emit([row_of[s] for s in emit], blocks[to_device([at[s] for s in emit], self.device)])
        return refresh

    def _advance_one(self, q: ODBRequest, slot: int, flags: list, idle: bool = False) -> tuple[bool, bool]:
        """One decode request after its step (``flags``: its row of ``_flags``; ``idle``: this
        step's forward of it, after the completing one, decided nothing: counted before its stats
        may go to the metrics). Returns whether its block goes out, and whether a refresh starts its
        next block."""
        complete, has_end, decided, masks_left, accepted, _ = flags
        if q.fault is not None and q.fault.kind == "raise" and q.fault.due(q.forwards_taken):
            raise faults.InjectedFault(f"debug fault {q.fault} in request {q.req_id}'s step")
        if idle:
            q.stats["idle_forwards"] += 1
        q.forwarded(bool(decided), accepted)
        q.masks_left = int(masks_left)
        if not complete:
            return False, False
        if q.complete_block(q.stops(bool(has_end))):
            if has_end:  # vLLM stops the request on this block (its EOS / stop string): count it
                self.table.ended(slot)  # now, not when vLLM's removal reaches us
            return True, True
        self.table.finish(slot)
        return True, False

    @staticmethod
    def _plans_next(q: ODBRequest) -> bool:
        """Jump-share plans a request's next step (greedy only, as in the reference loop). Whether
        its block goes on, and with how many masks, is on the device: a block with fewer than two
        masks left (a draft needs one to leave undecided) gets a plan of its base branch alone."""
        return q.cfg.jump and not q.finished and q.error is None and q.cfg.temperature == 0

    def _plan_decoded(self, slots: list[int], reqs: list[ODBRequest], step: Step) -> None:
        """After a decode step: each request's plan is spent; jump-share plans the next step of
        those that plan (``_plans_next``) from the branch just adopted (row i of ``step``)."""
        jobs = []
        for i, (slot, q) in enumerate(zip(slots, reqs)):
            q.plan = None
            if self._plans_next(q):
                jobs.append((i, slot, q))
        if jobs:
            self._plans(jobs, step)

    @contextmanager
    def _own_part(self, slot: int, q: ODBRequest):
        """A request's own part of the step: an exception in it fails that request only
        (``RequestTable.fail``: it ends with an error) and the step goes on for the others. A
        device error is the engine's, not the request's: after the exception a device sync runs,
        and raises if the device failed."""
        try:
            yield
        except Exception as e:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            log.exception("vllm-odb: request %s raised in its part of the step", q.req_id)
            self.table.fail(slot, f"{type(e).__name__}: {e}")

    def _faults_due(self, reqs: list[ODBRequest]) -> list[int]:
        """Debug fault injection (engine/faults.py) at this forward of ``reqs``: a ``crash`` raises
        here, failing the whole step; returns the indices whose logits turn to NaN (``raise``
        faults fire in the request's own part of the step)."""
        nan = []
        for i, q in enumerate(reqs):
            f = q.fault
            if f is None or q.finished or not f.due(q.forwards_taken):
                continue
            if f.kind == "crash":
                raise faults.InjectedFault(f"debug fault {f} in request {q.req_id}: the whole step fails")
            if f.kind == "nan":
                nan.append(i)
        return nan

    def _refresh(self, jobs: list[tuple[int, int]]) -> None:
        """Refresh forward for each (slot, batch row); ALP on its canvas predictions; then the
        first step of the new block from the same forward. The side forwards run in chunks of at
        most the runner's token budget (``max_num_batched_tokens``: the activation size vLLM's
        memory profile measured, so the KV cache it sized leaves room for them; one request longer
        than the budget runs alone)."""
        table, blk, shift = self.table, self.block, self.shift
        checked = []
        for slot, row in jobs:  # host-side invariants of the rows read below (cheap: Python ints)
            q = table.get(slot)
            with self._own_part(slot, q):
                if q.fault is not None and q.fault.kind == "raise" and q.fault.due(q.forwards_taken):
                    raise faults.InjectedFault(f"debug fault {q.fault} in request {q.req_id}'s refresh")
                if not (shift <= q.start and q.start + blk <= q.end <= table.max_model_len + self.width):
                    raise RuntimeError(f"vllm-odb: refresh of request {q.req_id} with block start {q.start}, canvas "
                                       f"end {q.end} (prompt {q.prompt_len}, gen {q.gen}, finished {q.finished})")
                checked.append((slot, row))
        jobs = checked
        if not jobs:
            return
        reqs = [table.get(s) for s, _ in jobs]
        cuts: list[tuple[list[tuple[int, ODBRequest]], torch.Tensor]] = []  # ALP's, not read yet
        steps = [self._refresh_chunk(jobs[a:b], reqs[a:b], cuts)
                 for a, b in token_chunks([q.keys for q in reqs], self.refresh_budget)]
        new, x0, conf = (torch.cat(t) for t in zip(*((s.block, s.x0, s.conf) for s in steps)))
        # plan the first jump-share step of the block from the refresh's predictions (on the device)
        planned = [(i, jobs[i][0], q) for i, q in enumerate(reqs) if self._plans_next(q)]
        if planned:
            self._plans(planned, Step(new, x0, conf))
        # ALP's cuts read last: one host sync for the whole refresh, after every launch above, so the
        # block steps' and the plans' launches run behind the refresh on the device instead of after
        # the sync (nothing above reads a request's canvas length: _cut_canvas says which do)
        self._apply_cuts(cuts)

    def _refresh_chunk(self, jobs: list[tuple[int, int]], reqs: list[ODBRequest],
                       cuts: list[tuple[list[tuple[int, ODBRequest]], torch.Tensor]]) -> Step:
        """One side forward over ``jobs``; ALP (its cuts appended to ``cuts`` for ``_apply_cuts``,
        or applied at once where this step's thresholds read the canvas); their first step.
        Returns it ([jobs, block])."""
        table, blk, shift = self.table, self.block, self.shift
        kept = [q.kept() for q in reqs]  # (stop, final): Streaming's pruned canvas, or all of it
        hidden, offsets = self.cache.forward(table.tokens, [(s, r, stop) + (() if final is None else (final,))
                                                            for (s, r), (stop, final) in zip(jobs, kept)])
        self._refresh_tokens += hidden.shape[0]  # the step observer's count (a host shape: no sync)
        first = to_device([o + q.start - shift for o, q in zip(offsets, reqs)], self.device)
        logits = self.cache.logits(hidden[(first[:, None] + self._cols[None]).reshape(-1)]).view(len(jobs), blk, -1)
        if self.table.faulty:  # debug fault injection only (engine/faults.py)
            for i in self._faults_due(reqs):
                logits[i] = float("nan")
        slots = to_device([s for s, _ in jobs], self.device)
        cols = table.block_cols(reqs)
        block = table.tokens[slots[:, None], cols]
        for q in reqs:
            q.refreshed(table.mask_id, self.cache.graphed)
        cut = self._cut_canvas(hidden, offsets, jobs, reqs)  # reads the canvas before this step commits
        if cut is not None:
            # Streaming's dynamic threshold and APD read the canvas after the block (q.kept()): the
            # cut must be on the host before this step decides; else it waits for _apply_cuts
            if any(q.cfg.alp and moving_thresholds(q.cfg) for q in reqs):  # only their own canvas moves
                self._apply_cuts([cut])
            else:
                cuts.append(cut)
        step = self._block_steps(reqs, slots, block, block == table.mask_id,
                                 lambda idx: logits if idx is None else logits[idx], len(reqs))
        for q in reqs:
            q.stepped()
        table.tokens[slots[:, None], cols] = step.block
        # non-finite logits fail the request when its next decode step's outcome is settled (_settle)
        table.unusable[slots] |= nonfinite_rows(step.conf)
        return step

    # ---- the policies, per request group --------------------------------------------------
    def _block_steps(self, reqs: list[ODBRequest], slots: torch.Tensor, block: torch.Tensor, masked: torch.Tensor,
                     logits_of: Callable[[torch.Tensor | None], torch.Tensor], tile: int) -> Step:
        """``policies.step.block_step`` for every request that decides without a plan, one call per
        knob set (and ``tile`` requests); ``logits_of(idx)``: the block logits of requests ``idx``
        (None: of all of them).
        Finished and planned requests keep their block (and zero predictions) here."""
        groups: dict = defaultdict(list)
        for i, q in enumerate(reqs):
            if not q.finished and q.plan is None:
                groups[q.cfg.step_knobs].append(i)
        accepted = torch.zeros(len(reqs), dtype=torch.long, device=block.device)
        # The usual step: every request decides, with one knob set, in one tile: on the batch as
        # it stands (no gathers, scatters or scratch copies).
        whole = len(reqs) <= tile and [len(m) for m in groups.values()] == [len(reqs)]
        if not whole:
            new, x0 = block.clone(), torch.zeros_like(block)
            conf = torch.zeros(block.shape, dtype=torch.float32, device=block.device)
        for cfg, members in groups.items():
            for a in range(0, len(members), tile):
                idx = None if whole else to_device(members[a:a + tile], block.device)
                group = [reqs[i] for i in members[a:a + tile]]
                lg = logits_of(idx)
                forced = forced_counts([q.forcing for q in group], [q.block_index for q in group],
                                       [q.block_step for q in group], block.device)
                rows = (lambda t: t) if whole else (lambda t: t[idx])
                s = block_step(lg, rows(block), rows(masked), cfg, self.table.mask_id,
                               threshold=self._thresholds(group, rows(slots), lg), forced=forced)
                if whole:
                    return Step(s.block, s.x0, s.conf, accepted)
                new[idx], x0[idx], conf[idx] = s.block, s.x0, s.conf
        return Step(new, x0, conf, accepted)

    def _thresholds(self, reqs: list[ODBRequest], slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """The commit thresholds of one step of ``reqs`` (one config; ``logits`` [R, block, V] of
        their blocks): None for the fixed threshold, else policies.adaptive's, from each request's
        block and the canvas after it (``BlockThresholds``: Streaming-dLLM's dynamic threshold,
        Dynamic-dLLM's APD with its per-block state on the request)."""
        if not moving_thresholds(reqs[0].cfg):
            return None
        table = self.table
        width = max(q.end - q.start for q in reqs)  # host ints: no device sync
        starts = to_device([q.start for q in reqs], slots.device)
        kept = [q.kept() for q in reqs]  # the suffix a step sees (Streaming's pruning, or all of it)
        stops = to_device([k[0] for k in kept], slots.device)
        finals = to_device([-1 if k[1] is None else k[1] for k in kept], slots.device)
        cols = starts[:, None] + torch.arange(width, device=slots.device)[None]
        valid = (cols < stops[:, None]) | (cols == finals[:, None])
        tokens = table.tokens[slots[:, None], cols.clamp(max=table.tokens.shape[1] - 1)]
        if reqs[0].cfg.rule != "adaptive":
            return streaming_threshold(reqs[0].cfg, tokens, valid, table.mask_id)
        return torch.cat([q.thresholds.step(logits[j:j + 1], tokens[j:j + 1], valid[j:j + 1])
                          for j, q in enumerate(reqs)])

    def _branch_steps(self, logits: torch.Tensor, firsts: list[int], slots: list[int], reqs: list[ODBRequest],
                      masked: torch.Tensor, step: Step) -> None:
        """The planned requests' steps, written into ``step``: ``policies.step.branch_step`` once
        per knob set and draft family (``firsts``: each request's first logit row). Should a group
        raise, its requests run one at a time, each in its own part of the step (a failure then
        fails that request only)."""
        groups: dict = defaultdict(list)
        for i, q in enumerate(reqs):
            if q.plan is not None and not q.finished:
                # Streaming's dynamic threshold reads each request's own suffix: alone
                key = ("alone", i) if q.cfg.threshold_alpha else (q.cfg.step_knobs, q.plan.branches.family.shape,
                                                                  q.plan.num_rows, q.forcing is not None)
                groups[key].append(i)
        self._in_groups(groups.values(), lambda m: self._branch_group(logits, firsts, slots, reqs, masked, step, m),
                        lambda i: (slots[i], reqs[i]))

    def _branch_group(self, logits: torch.Tensor, firsts: list[int], slots: list[int], reqs: list[ODBRequest],
                      masked: torch.Tensor, step: Step, members: list[int]) -> None:
        """One ``branch_step`` on requests ``members`` (one knob set, family and plan width): each
        query row of a plan is predicted once (greedy: argmax and confidence), and branch b's slot t
        takes row ``pred_row[b, t]``'s (a shared-layout draft reads the base's rows where it has
        none), so the vocabulary-wide work is the plan's rows, not branches x block."""
        qs = [reqs[i] for i in members]
        plans = [q.plan for q in qs]
        nb, blk = plans[0].branches.blocks.shape[1:]
        q = plans[0].num_rows
        if len(qs) == 1:
            i, branches = members[0], plans[0].branches
            lg = logits[firsts[i]:firsts[i] + q]  # the request's rows: a view
            pred = plans[0].pred_row[None]
            active = masked[i].any()[None]
        else:
            i = to_device(members, masked.device)
            rows = to_device([firsts[j] for j in members], masked.device)[:, None] + self.table.arange(q)[None]
            lg = logits[rows.reshape(-1)]
            pred = torch.stack([p.pred_row for p in plans])
            b = [p.branches for p in plans]
            branches = Branches(torch.cat([x.blocks for x in b]), torch.cat([x.positions for x in b]),
                                torch.cat([x.drafted for x in b]), b[0].family, torch.cat([x.valid for x in b]), None)
            active = masked[i].any(1)
        x0, conf = predict(drop_token(lg, self.table.mask_id), qs[0].cfg.confidence)
        at = pred.reshape(len(qs), -1)
        preds = tuple(t.view(len(qs), q).gather(1, at).view(len(qs), nb, blk) for t in (x0, conf))
        suffix = None
        if qs[0].cfg.threshold_alpha:  # (alone) Streaming's dynamic threshold per branch: its block + the suffix
            sfx = self.table.tokens[slots[members[0]], qs[0].suffix_cols()][None]
            suffix = (sfx, torch.ones_like(sfx, dtype=torch.bool))
        forced = forced_counts([r.forcing for r in qs], [r.block_index for r in qs], [r.block_step for r in qs],
                               lg.device)
        s = branch_step(None, branches, active, qs[0].cfg, self.table.mask_id, suffix, forced, preds)
        if len(qs) == 1:
            step.block[i], step.x0[i], step.conf[i], step.accepted[i] = s.block[0], s.x0[0], s.conf[0], s.accepted[0]
        else:
            step.block[i], step.x0[i], step.conf[i], step.accepted[i] = s.block, s.x0, s.conf, s.accepted

    def _plans(self, jobs: list[tuple[int, int, ODBRequest]], step: Step) -> None:
        """Jump-share: the branches of each job's next step (row ``i`` of ``step``, request ``q``
        in ``slot``), from the branch it just adopted, in the rows the next step gives each
        request (``next_width``), with no device read. One ``JumpPlan.plan_many`` per knob set.
        Should a group raise, its requests are planned one at a time, each in its own part of the
        step."""
        if self.next_width <= self.table.window:  # the batch's share is the window: no draft fits
            return
        groups: dict = defaultdict(list)
        for job in jobs:
            groups[job[2].cfg.step_knobs].append(job)
        self._in_groups(groups.values(), lambda m: self._plan_group(step, m), lambda job: (job[1], job[2]))

    def _in_groups(self, groups, run: Callable[[list], None], owner: Callable[[Any], tuple[int, ODBRequest]]) -> None:
        """``run`` each group of requests at once. Should a group raise, its members run one at a
        time, each in its own part of the step (``owner``: a member's slot and request), where a
        failure is reported and fails that request only."""
        for members in groups:
            if len(members) > 1:
                try:
                    run(members)
                    continue
                except Exception:  # noqa: BLE001 -- retried one at a time below, where it is reported
                    log.warning("vllm-odb: a batched jump-share group raised; its requests run one at a time")
            for m in members:
                with self._own_part(*owner(m)):
                    run([m])

    def _plan_group(self, step: Step, members: list[tuple[int, int, ODBRequest]]) -> None:
        table, shift = self.table, self.shift
        if len(members) == 1:  # views of the request's rows
            i, slot, q = members[0]
            block, x0, conf = step.block[i][None], step.x0[i][None], step.conf[i][None]
            before = table.tokens[slot, q.start - shift:q.start][None]
        else:
            idx = to_device([i for i, *_ in members], self.device)
            slots = to_device([slot for _, slot, *_ in members], self.device)
            starts = to_device([q.start - shift for _, _, q in members], self.device)
            block, x0, conf = step.block[idx], step.x0[idx], step.conf[idx]
            before = table.tokens[slots[:, None], starts[:, None] + table.arange(shift)[None]]  # [G, shift]
        # The draft budget is shared by this step's batch (the requests scheduled): the share
        # knobs.step_width gave the next step's rows. A request's own ridge_rows above the engine's
        # would plan past them: the engine's bounds it.
        cfg = members[0][2].cfg
        if cfg.ridge_rows > table.engine.ridge_rows:
            cfg = cfg.replace(ridge_rows=table.engine.ridge_rows)
        plans = JumpPlan.plan_many(block, before, x0, conf, table.mask_id, cfg, self.batch, self.next_width)
        for (_, _, q), plan in zip(members, plans):
            q.plan = plan

    def _block_ends(self, reqs: list[ODBRequest], slots: list[int], blocks: torch.Tensor) -> torch.Tensor:
        """[R] each request's new block completes one of its end markers (policies.step.block_ends;
        a stop string of several tokens may start before the block), or its trace ends here."""
        forced = forced_ends([q.forcing for q in reqs], [q.block_index for q in reqs], self.device)
        markers = [q.markers for q in reqs]
        context = max((len(m) for ms in markers for m in ms), default=1) - 1
        if context <= 0:
            return block_ends(blocks, markers, forced)
        cols = self.table.block_cols(reqs, context)
        prompt = to_device([q.prompt_len for q in reqs], self.device)
        tokens = self.table.tokens[to_device(slots, self.device)[:, None], cols.clamp(min=0)]
        return block_ends(tokens, markers, forced, valid=cols >= prompt[:, None])

    def _cut_canvas(self, hidden: torch.Tensor, offsets: list[int], jobs: list[tuple[int, int]],
                    reqs: list[ODBRequest]) -> tuple[list[tuple[int, ODBRequest]], torch.Tensor] | None:
        """Adaptive length prediction (policies.step.cut_canvas) for the refreshed requests with
        ``alp``: the refresh forward predicts every still-masked canvas position; a confident end
        marker cuts the live canvas after its block. Returns ([(slot, request)], their canvas
        lengths on the device), for ``_apply_cuts``; None when no request has ALP. Until then the
        requests keep their canvas length on the host (``q.gen``, ``q.end``, ``q.kept()``)."""
        groups: dict = defaultdict(list)
        for i, q in enumerate(reqs):
            if q.cfg.alp:
                groups[q.cfg.step_knobs, q.markers].append(i)
        if not groups:
            return None
        order, cuts = [], []
        for (cfg, markers), members in groups.items():
            group = [reqs[i] for i in members]
            x0, conf, scan = self._canvas(hidden, [offsets[i] for i in members], [jobs[i][0] for i in members], group)
            gen = to_device([q.gen for q in group], self.device)
            forced = forced_lengths([q.forcing for q in group], [q.block_index for q in group], [q.gen for q in group],
                                    self.device)
            cuts.append(cut_canvas(x0, conf, scan, 0, gen, markers, cfg, forced))
            order += [(jobs[i][0], reqs[i]) for i in members]
        return order, torch.cat(cuts)

    def _apply_cuts(self, cuts: list[tuple[list[tuple[int, ODBRequest]], torch.Tensor]]) -> None:
        """ALP's cuts on the host (one sync for them all): later steps attend only to the live
        canvas (the dual cache's sequence length is ``prompt + gen``), later refreshes process only
        it, and the KV blocks past it go back to vLLM's pool (``PagedCache.release``)."""
        if not cuts:
            return
        order = [job for jobs, _ in cuts for job in jobs]
        for (slot, q), gen in zip(order, torch.cat([c for _, c in cuts]).tolist()):
            if q.cut(int(gen)):
                self.cache.paged.release(q.req_id, slot, q.end, self.width - self.block)

    def _canvas(self, hidden: torch.Tensor, offsets: list[int], slots: list[int], reqs: list[ODBRequest]):
        """ALP's inputs for ``reqs`` from their refresh rows: predictions and confidences of every
        canvas position (``policies.length.canvas_predictions``, ``_ALP_ROWS`` rows at a time) and
        which of them are still masked ([R, longest canvas] each)."""
        table, shift = self.table, self.shift
        width = max(q.gen for q in reqs)
        x0 = torch.full((len(reqs), width), table.mask_id, dtype=torch.long, device=hidden.device)
        conf = torch.zeros((len(reqs), width), dtype=torch.float32, device=hidden.device)
        scan = torch.zeros((len(reqs), width), dtype=torch.bool, device=hidden.device)
        for j, q in enumerate(reqs):
            a = q.start - q.prompt_len  # canvas column of the block start
            for c in range(a, q.gen, _ALP_ROWS):  # bounded fp32 [rows, vocab] at a time
                d = min(q.gen, c + _ALP_ROWS)
                rows = offsets[j] + q.prompt_len + c - shift + torch.arange(d - c, device=hidden.device)
                x0[j, c:d], conf[j, c:d] = canvas_predictions(self.cache.logits(hidden[rows]), table.mask_id)
            scan[j, a:q.gen] = table.tokens[slots[j], q.start:q.end] == table.mask_id
        return x0, conf, scan

    def _write_drafts(self, slots: list[int]) -> None:
        """Next step's query rows of each request: ``tokens[s - shift : s - shift + width]``, or a
        jump-share plan's rows (the base window, then the drafts; the rest is padding)."""
        if not slots:
            return
        table = self.table
        slot_t = to_device(slots, self.device)
        starts = to_device([table.get(s).start - self.shift for s in slots], self.device)
        cols = starts[:, None] + table.arange(self.width)[None]
        self.req_states.draft_tokens[slot_t, : self.width] = table.tokens[slot_t[:, None], cols]
        for s in slots:
            plan = table.get(s).plan
            if plan is not None:
                self.req_states.draft_tokens[s, : plan.num_rows] = plan.tokens


def nonfinite_rows(conf: torch.Tensor) -> torch.Tensor:
    """[B] rows of ``conf`` [B, K] holding a NaN or an inf. ``x - x`` is exactly 0 for a finite x and
    NaN otherwise: three kernels where ``~isfinite(x).all(1)`` launches six (every decode step)."""
    return ((conf - conf) != 0).any(1)


def token_chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of ``lengths`` whose sums stay within ``budget`` (an item longer
    than the budget gets a range of its own)."""
    chunks, a, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > a and total + n > budget:
            chunks.append((a, i))
            a, total = i, 0
        total += n
    if lengths:
        chunks.append((a, len(lengths)))
    return chunks


def _check_actions(input_batch, rows: StepRows, refresh: list[tuple[int, int]], out: StepOutput) -> None:
    """VLLM_ODB_CHECK=1: each row's action this step goes to its history (engine/check.py)."""
    actions = {**{int(r): "prefill chunk" for r in rows.prefill},
               **{int(r): "short window" for r in rows.partial},
               **{int(r): "decode" for r in rows.decode}}
    actions.update({r: actions.get(r, "?") + " + refresh" for _, r in refresh})
    check.sampled(input_batch, rows.nlog, actions, out.num_sampled, out.num_rejected)


def _checkpoint(where: str) -> None:
    """VLLM_ODB_CHECK=1: a device sync after each phase, so a failing kernel of ours raises in it."""
    if CHECK and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception as e:
            raise RuntimeError(f"vllm-odb check: the sampler's {where} phase failed on the device") from e
