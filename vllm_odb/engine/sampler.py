"""``ODBSampler``: block-diffusion decoding on vLLM's V2 runner, through the shared policy core.

The runner hands over the logits of every decode request's query window (``width`` rows) after
each forward. Per request and step, top to bottom (the reference loop's order, policies shared):

    block logits (Dream: from the position before each slot) -> policies.decide -> new block
      (jump-share: every branch's logits -> policies.decide per branch -> policies.jump.accept
       -> the adopted branch's block; engine/branches.py)
    block complete?  no  -> the block goes back as the next step's draft slots (num_sampled 0);
                            jump-share plans the next step's drafts from the adopted branch
                     yes -> commit it (num_sampled = block); done if the canvas is, or (early_stop)
                            the block holds an end marker; else refresh: one forward over
                            prompt + live canvas rewrites the cache, its canvas predictions give
                            ALP's new length (alp), and its block logits take the next block's
                            first step (engine/refresh.py)

A prompt's prefill step ends the same way (refresh, first step of block 0). A block that the
refresh step already completes is committed on the next step. A finished request (canvas done, or
an end marker with ``early_stop``) commits EOS blocks until vLLM's stop check ends it.

Logits are read in tiles over requests (``_TILE_BYTES`` of fp32 work each), so the sampler never
holds more than a bounded slice of [requests x block, vocab] in fp32 at once. One host sync per
step (which blocks completed) decides the refreshes; jump-share planning adds a few per planned
request (the layout's row count), and ALP one per step with refreshes.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.output import SamplerOutput

from vllm_odb.engine import CHECK, check, kv_release
from vllm_odb.engine.branches import plan_jump
from vllm_odb.engine.refresh import refresh
from vllm_odb.engine.requests import decode_rows
from vllm_odb.policies import decide
from vllm_odb.policies.adaptive import BlockThresholds, streaming_threshold
from vllm_odb.policies.confidence import drop_token, predict
from vllm_odb.policies.host import to_device
from vllm_odb.policies.jump import accept
from vllm_odb.policies.length import marker_hits, predict_length
from vllm_odb.policies.replay import forced_commit

log = logging.getLogger(__name__)
_NO_PENALTIES = SimpleNamespace(output_bin_counts=None)
_TILE_BYTES = 1 << 30  # fp32 bytes of [rows, vocab] decided at once (decide keeps ~4 copies)
_ALP_ROWS = 256  # canvas rows projected to the vocabulary at once for length prediction
# VLLM_ODB_PROFILE=path: append one JSON line per engine step (wall time since the previous step
# ended, what ran). Adds a device sync per step; for benchmarks only.
_PROFILE_ENV = "VLLM_ODB_PROFILE"
# VLLM_ODB_REFRESH_TOKENS=n: refresh side forwards of up to n tokens instead of the runner's token
# budget (debugging: past the budget, a side forward may need memory vLLM's profile did not leave).
_REFRESH_TOKENS_ENV = "VLLM_ODB_REFRESH_TOKENS"


class ODBSampler:
    def __init__(self, state, base_sampler):
        self.state = state
        self.table = state.table
        self.sampling_states = base_sampler.sampling_states
        self.req_states = base_sampler.req_states
        self.block = self.table.block
        self.width = self.table.width
        self.shift = self.table.shift
        self._device = state.device
        self._cols = torch.arange(self.block, device=state.device)
        self._profile = os.environ.get(_PROFILE_ENV)
        self._last_end = None
        self._jumps: list[dict] = []  # jump-share decisions of the step (profiling only)
        # tokens per refresh side forward (VLLM_ODB_REFRESH_TOKENS: debugging override)
        self.refresh_budget = int(os.environ.get(_REFRESH_TOKENS_ENV) or state.max_num_tokens)

    # ---- the runner's sampler surface -------------------------------------------------------
    @property
    def penalties_state(self):
        return _NO_PENALTIES  # no penalties on the diffusion path; the runner reads this stub

    def add_request(self, req_idx: int, prompt_len: int, sampling_params) -> None:
        self.sampling_states.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self.sampling_states.apply_staged_writes()

    # ---- one step -----------------------------------------------------------------------------
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

    def _step(self, logits: torch.Tensor, input_batch) -> SamplerOutput:
        table = self.table
        n = input_batch.num_reqs
        slots_np = input_batch.idx_mapping_np[:n]
        # Fresh output tensors every step: the runner copies them to the host on another stream
        # (async output) and keeps only a reference, so a reused buffer could be overwritten by the
        # next step before that copy reads it.
        sampled = torch.zeros((n, self.width), dtype=torch.int32, device=self._device)
        num_sampled = torch.zeros(n, dtype=torch.int32, device=self._device)
        num_rejected = torch.zeros(n, dtype=torch.int32, device=self._device)
        if input_batch.num_draft_tokens == 0:  # an all-prefill batch: the runner gives each row
            nlog = np.zeros(n, dtype=np.int64)  # one logit (its last token), which we do not use
        else:
            nlog = np.diff(input_batch.cu_num_logits_np[: n + 1])
        # A decode step is a full window (the rows model_state set up). The scheduler may give a
        # running request fewer slots (token budget, max_model_len): that step decides nothing
        # and all its slots are rejected, so vLLM's computed count stays where it was.
        full = decode_rows(input_batch, self.width)
        full = full[nlog[full] == self.width]
        dec_rows = [r for r in full if table.get(int(slots_np[r])) is not None]
        partial = np.setdiff1d(np.flatnonzero(nlog > 0), full)
        refresh_jobs: list[tuple[int, int]] = []  # (slot, batch row)

        emitted = False  # a block went out this step (it may end its request)
        if dec_rows:
            emitted = self._decode(logits, input_batch, dec_rows, sampled, num_sampled, refresh_jobs)
            _checkpoint("decode")
            rows_t = to_device(dec_rows, sampled.device)
            num_rejected[rows_t] = self.width - num_sampled[rows_t]
        if len(partial):
            num_rejected[to_device(partial, sampled.device)] = to_device(nlog[partial], sampled.device,
                                                                         num_rejected.dtype)

        # Prompts whose prefill completes this step: their first block starts with a refresh.
        prefill_rows = np.flatnonzero((nlog == 0) & input_batch.is_prefilling_np[:n])
        for r in prefill_rows:
            slot = int(slots_np[r])
            req = table.get(slot)
            done = (input_batch.num_computed_prefill_tokens_np[r] + input_batch.num_scheduled_tokens[r]
                    >= input_batch.prefill_len_np[r])
            if req is not None and done and not req.finished:
                refresh_jobs.append((slot, int(r)))
        if CHECK:
            refreshed = {r for _, r in refresh_jobs}
            actions = {**{int(r): "prefill chunk" for r in prefill_rows},
                       **{int(r): "short window" for r in partial},
                       **{int(r): "decode" for r in dec_rows}}
            actions.update({r: actions.get(r, "?") + " + refresh" for r in refreshed})
            check.sampled(input_batch, nlog, actions, num_sampled, num_rejected)
        t_refresh = time.perf_counter()
        if refresh_jobs:
            self._refresh(refresh_jobs)
            _checkpoint("refresh")

        touched = sorted({int(slots_np[r]) for r in dec_rows} | {s for s, _ in refresh_jobs}
                         | {int(slots_np[r]) for r in np.flatnonzero(nlog == 0)
                            if table.get(int(slots_np[r])) is not None})
        self._write_drafts(touched)
        _checkpoint("drafts")
        # Steps that emit a block may end requests: their counts land at once.
        table.counters.flush(force=emitted or table.idle())
        if self._profile:
            self._record(input_batch, dec_rows, refresh_jobs, t_refresh)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None, num_nans=None,
                             num_sampled=num_sampled, num_rejected=num_rejected)

    def _record(self, input_batch, dec_rows, refresh_jobs, t_refresh) -> None:
        torch.cuda.synchronize()
        now = time.perf_counter()
        row = {"step_s": None if self._last_end is None else now - self._last_end,
               "refresh_s": now - t_refresh if refresh_jobs else 0.0,
               "decode_reqs": len(dec_rows), "refresh_reqs": len(refresh_jobs),
               "refresh_tokens": sum(self.table.get(s).keys for s, _ in refresh_jobs),
               "kv_tokens": sum(self.table.get(int(input_batch.idx_mapping_np[r])).keys for r in dec_rows),
               "tokens": int(input_batch.num_tokens), "reqs": int(input_batch.num_reqs), "jumps": self._jumps}
        self._jumps = []
        with open(self._profile, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._last_end = now

    def _decode(self, logits, input_batch, dec_rows, sampled, num_sampled, refresh_jobs) -> bool:
        table, blk = self.table, self.block
        slots_np = input_batch.idx_mapping_np
        cu = input_batch.cu_num_logits_np
        device = sampled.device
        reqs = [table.get(int(slots_np[r])) for r in dec_rows]
        slots = to_device([int(slots_np[r]) for r in dec_rows], device)
        cols = to_device([q.start for q in reqs], device)[:, None] + self._cols[None]
        block = table.tokens[slots[:, None], cols]  # [D, block]
        masked = block == table.mask_id
        new = block.clone()
        # Logit rows 0..block-1 of each request's window predict its block slots (for Dream the
        # window starts one position early, so row j is position s-1+j and predicts slot j).
        first_row = to_device([int(cu[r]) for r in dec_rows], device)
        groups: dict = defaultdict(list)
        planned = []
        for i, q in enumerate(reqs):
            if q.finished:
                continue
            (planned if q.plan is not None else groups[q.cfg]).append(i)
        vocab = logits.shape[-1]
        adopted_x0 = torch.zeros_like(block)
        adopted_conf = torch.zeros(block.shape, dtype=torch.float32, device=device)
        tile = max(1, _TILE_BYTES // (blk * vocab * 4))
        for cfg, members in groups.items():
            for a in range(0, len(members), tile):
                idx = to_device(members[a:a + tile], device)
                rows = (first_row[idx][:, None] + self._cols[None]).reshape(-1)
                lg = logits[rows].view(len(idx), blk, vocab)
                tile_reqs = [reqs[i] for i in members[a:a + tile]]
                x0, conf, commit = decide(lg, masked[idx], cfg, table.mask_id,
                                          threshold=self._thresholds(tile_reqs, slots[idx], lg))
                commit = _force(commit, conf, masked[idx], tile_reqs)
                new[idx] = torch.where(commit, x0, block[idx])
                adopted_x0[idx], adopted_conf[idx] = x0, conf
        accepted = torch.zeros(len(reqs), dtype=torch.long, device=device)
        for i in planned:
            new[i], adopted_x0[i], adopted_conf[i], accepted[i] = self._jump_decide(
                logits, int(cu[dec_rows[i]]), reqs[i], masked[i])
        table.tokens[slots[:, None], cols] = new
        masked_after = new == table.mask_id
        complete = ~masked_after.any(1)
        ends = marker_hits(new, table.markers).any(1)
        # the step's host sync
        flags = torch.stack([complete, ends, masked.any(1), masked_after.sum(1), accepted], 1).tolist()
        done_rows = []
        live = sum(1 for i, q in enumerate(reqs) if not q.finished and not flags[i][0])
        for i, (r, q) in enumerate(zip(dec_rows, reqs)):
            is_complete, has_end, had_masks, left, took = flags[i]
            if q.replay is not None:  # the trace says where decoding ends, not this model's EOS
                has_end = q.replay.last(q.block_index)
            q.block_step += 1
            q.stats["forwards" if had_masks else "idle_forwards"] += 1
            q.stats["drafts_accepted"] += took
            q.plan = None
            if not is_complete:
                if q.cfg.jump and not q.finished:
                    self._plan(q, int(slots_np[r]), new[i], adopted_x0[i], adopted_conf[i], left, live)
                continue
            done_rows.append(i)
            if not q.finished:
                q.stats["tokens"] += blk
            q.start += blk
            q.block_step = 0
            if q.finished or q.start >= q.end or ((q.cfg.early_stop or q.replay is not None) and has_end):
                table.finish(int(slots_np[r]))
            else:
                if has_end:  # vLLM stops the request on this block (its EOS / stop string): count it
                    table.ended(int(slots_np[r]))  # now, not when vLLM's removal reaches us
                refresh_jobs.append((int(slots_np[r]), int(r)))
        if done_rows:
            d = to_device(done_rows, device)
            out_rows = to_device([dec_rows[i] for i in done_rows], device)
            sampled[out_rows, :blk] = new[d].to(sampled.dtype)
            num_sampled[out_rows] = blk
        return bool(done_rows)

    def _thresholds(self, reqs: list, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        """The commit thresholds of one step of ``reqs`` (one config; ``logits`` [R, block, V] of
        their blocks): None for the fixed threshold, else policies.adaptive's, from each request's
        block and the canvas after it (``BlockThresholds``: Streaming-dLLM's dynamic threshold,
        Dynamic-dLLM's APD with its per-block state on the request)."""
        if not _adaptive(reqs[0].cfg):
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

    def _jump_decide(self, logits, first_row: int, q, masked):
        """One planned request: decide every branch from its rows' logits, adopt the furthest
        verified draft (policies.jump.accept). Returns the new block, the adopted branch's
        predictions and the number of drafted tokens adopted."""
        plan = q.plan
        nb, blk = plan.blocks.shape
        lg = logits[first_row + plan.pred_row.reshape(-1)].view(nb, blk, -1)
        br_masked = (plan.blocks == self.table.mask_id) & masked.any()
        threshold = None
        if q.cfg.threshold_alpha:  # Streaming's dynamic threshold per branch: its block + the suffix
            sfx = self.table.tokens[self.table.slot_of[q.req_id], q.suffix_cols()]
            tokens = torch.cat([plan.blocks, sfx[None].expand(nb, -1)], 1)
            threshold = streaming_threshold(q.cfg, tokens, torch.ones_like(tokens, dtype=torch.bool),
                                            self.table.mask_id)
        x0, conf, commit = decide(lg, br_masked, q.cfg, self.table.mask_id, threshold=threshold)
        valid = torch.ones((1, plan.family.shape[0]), dtype=torch.bool, device=x0.device)
        if q.replay is not None:  # the recorded commits land on the base branch
            commit[:1] = _force(commit[:1], conf[:1], br_masked[:1], [q])
            choice = torch.zeros(1, dtype=torch.long, device=x0.device)
        else:
            choice = accept(commit[None], x0[None], plan.positions[None], plan.drafted[None], plan.family, valid)
        pick = choice.view(1, 1).expand(1, blk)
        chosen = lambda t: t.gather(0, pick)[0]  # noqa: E731
        new = torch.where(chosen(commit), chosen(x0), chosen(plan.blocks))
        sizes = torch.cat([torch.zeros(1, dtype=torch.long, device=x0.device), plan.family.sum(1)])
        if self._profile:
            self._jumps.append({"req": q.req_id, "start": q.start, "p": int(plan.family.shape[1]),
                                "rows": plan.num_rows, "choice": int(choice[0]),
                                "masked": int(masked.sum()), "new_masked": int((new == self.table.mask_id).sum())})
        return new, chosen(x0), chosen(conf), sizes[choice[0]]

    def _plan(self, q, slot: int, block, x0, conf, masked_left: int, live: int) -> None:
        """Jump-share: the branches of the request's next step (engine/branches.py); greedy only,
        as in the reference loop."""
        if q.cfg.temperature > 0 or masked_left < 2:
            return
        before = self.table.tokens[slot, q.start - self.shift:q.start]
        q.plan = plan_jump(block, before, x0, conf, self.table.mask_id, q.cfg, max(1, live), self.shift, self.width)

    def _refresh(self, jobs: list[tuple[int, int]]) -> None:
        """Refresh forward for each (slot, batch row); ALP on its canvas predictions; then the
        first step of the new block from the same forward. The side forwards run in chunks of at
        most the runner's token budget (``max_num_batched_tokens``: the activation size vLLM's
        memory profile measured, so the KV cache it sized leaves room for them; one request longer
        than the budget runs alone)."""
        table, blk, shift = self.table, self.block, self.shift
        reqs = [table.get(s) for s, _ in jobs]
        for q in reqs:  # host-side invariants of the rows read below (cheap: Python ints)
            if not (shift <= q.start and q.start + blk <= q.end <= table.max_model_len + self.width):
                raise RuntimeError(f"vllm-odb: refresh of request {q.req_id} with block start {q.start}, "
                                   f"canvas end {q.end} (prompt {q.prompt_len}, gen {q.gen}, finished {q.finished})")
        for q in reqs:  # a new block: APD's per-position state starts over
            q.thresholds = BlockThresholds(q.cfg, table.mask_id) if _adaptive(q.cfg) else None
        out = [self._refresh_chunk(jobs[a:b], reqs[a:b])
               for a, b in token_chunks([q.keys for q in reqs], self.refresh_budget)]
        new, adopted_x0, adopted_conf = (torch.cat(t) for t in zip(*out))
        jumping = [i for i, q in enumerate(reqs) if q.cfg.jump]
        if jumping:  # plan the first jump-share step of the block from the refresh's predictions
            left = (new == table.mask_id).sum(1).tolist()
            live = sum(1 for n in left if n)
            for i in jumping:
                if left[i]:
                    self._plan(reqs[i], jobs[i][0], new[i], adopted_x0[i], adopted_conf[i], left[i], live)

    def _refresh_chunk(self, jobs: list[tuple[int, int]], reqs: list) -> tuple[torch.Tensor, ...]:
        """One side forward over ``jobs``; commits their first step. Returns each job's new block
        and the adopted predictions and confidences behind it ([jobs, block] each)."""
        table, blk, shift = self.table, self.block, self.shift
        state = self.state
        kept = [q.kept() for q in reqs]  # (stop, final): Streaming's pruned canvas, or all of it
        hidden, offsets = refresh(state.model, table.tokens,
                                  [(s, r, stop, q.start, final) for (s, r), q, (stop, final) in zip(jobs, reqs, kept)],
                                  state.block_tables, state.kernel_block_size, shift)
        device = hidden.device
        slots = to_device([s for s, _ in jobs], device)
        first = to_device([o + q.start - shift for o, q in zip(offsets, reqs)], device)
        logits = state.model.compute_logits(hidden[(first[:, None] + self._cols[None]).reshape(-1)])
        logits = logits.view(len(jobs), blk, -1)
        cols = to_device([q.start for q in reqs], device)[:, None] + self._cols[None]
        block = table.tokens[slots[:, None], cols]
        masked = block == table.mask_id
        groups: dict = defaultdict(list)
        for i, q in enumerate(reqs):
            groups[q.cfg].append(i)
            q.stats["forwards"] += 1
            q.stats["refreshes"] += 1
            q.stats["refresh_tokens"] += q.keys
        self._predict_lengths(hidden, offsets, jobs, reqs)  # reads the canvas before this step commits
        new = block.clone()
        adopted_x0 = torch.zeros_like(block)
        adopted_conf = torch.zeros(block.shape, dtype=torch.float32, device=device)
        for cfg, members in groups.items():
            idx = to_device(members, device)
            group = [reqs[i] for i in members]
            x0, conf, commit = decide(logits[idx], masked[idx], cfg, table.mask_id,
                                      threshold=self._thresholds(group, slots[idx], logits[idx]))
            commit = _force(commit, conf, masked[idx], group)
            new[idx] = torch.where(commit, x0, block[idx])
            adopted_x0[idx], adopted_conf[idx] = x0, conf
        for q in reqs:
            q.block_step = 1
        table.tokens[slots[:, None], cols] = new
        return new, adopted_x0, adopted_conf

    def _predict_lengths(self, hidden, offsets, jobs, reqs) -> None:
        """Adaptive length prediction (policies/length.py) for the refreshed requests with ``alp``:
        the refresh forward predicts every still-masked canvas position; a confident end marker
        cuts the live canvas after its block. Later steps attend only to the live canvas (the
        dual cache's sequence length is ``prompt + gen``) and later refreshes process only it."""
        table, shift = self.table, self.shift
        groups: dict = defaultdict(list)
        for i, q in enumerate(reqs):
            if q.cfg.alp:
                groups[q.cfg].append(i)
        if not groups:
            return
        device = hidden.device
        cut: list[tuple[int, torch.Tensor]] = []
        for cfg, members in groups.items():
            width = max(reqs[i].gen for i in members)
            x0 = torch.full((len(members), width), table.mask_id, dtype=torch.long, device=device)
            conf = torch.zeros((len(members), width), dtype=torch.float32, device=device)
            scan = torch.zeros((len(members), width), dtype=torch.bool, device=device)
            for j, i in enumerate(members):
                q, slot = reqs[i], jobs[i][0]
                a = q.start - q.prompt_len  # canvas column of the block start
                for c in range(a, q.gen, _ALP_ROWS):  # bounded fp32 [rows, vocab] at a time
                    d = min(q.gen, c + _ALP_ROWS)
                    rows = offsets[i] + q.prompt_len + c - shift + torch.arange(d - c, device=device)
                    x0[j, c:d], conf[j, c:d] = predict(drop_token(self.state.model.compute_logits(hidden[rows]),
                                                                  table.mask_id))
                scan[j, a:q.gen] = table.tokens[slot, q.start:q.end] == table.mask_id
            gen = to_device([reqs[i].gen for i in members], device)
            new = predict_length(x0, conf, scan, 0, gen, table.markers, cfg.alp_threshold, cfg.block_length,
                                 cfg.alp_min_length)
            cut.extend(zip(members, new))
        lengths = torch.stack([n for _, n in cut]).tolist()  # one host sync for the step's refreshes
        for (i, _), g in zip(cut, lengths):
            q = reqs[i]
            if q.replay is not None:  # the recorded cut (the predictions above are ALP's cost)
                g = min(q.gen, q.replay.length(q.block_index, q.gen))
            if int(g) < q.gen:
                q.gen = int(g)
                if kv_release.note(q.req_id, q.end):  # the scheduler frees the KV blocks past it
                    self.state.trim_blocks(jobs[i][0], q.end + self.width - self.block)  # and so do we
            q.stats["canvas_predicted"] = q.gen

    def _write_drafts(self, slots: list[int]) -> None:
        """Next step's query rows of each request: ``tokens[s - shift : s - shift + width]``, or a
        jump-share plan's rows (the base window, then the drafts; the rest is padding)."""
        if not slots:
            return
        table = self.table
        device = table.tokens.device
        slot_t = to_device(slots, device)
        starts = to_device([table.get(s).start - self.shift for s in slots], device)
        cols = starts[:, None] + torch.arange(self.width, device=device)[None]
        self.req_states.draft_tokens[slot_t, : self.width] = table.tokens[slot_t[:, None], cols]
        for s in slots:
            plan = table.get(s).plan
            if plan is not None:
                self.req_states.draft_tokens[s, : plan.num_rows] = plan.tokens


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


def _adaptive(cfg) -> bool:
    """Thresholds that move during a block (policies/adaptive.py)."""
    return cfg.rule == "adaptive" or bool(cfg.threshold_alpha)


def _checkpoint(where: str) -> None:
    """VLLM_ODB_CHECK=1: a device sync after each phase, so a failing kernel of ours raises in it."""
    if CHECK and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception as e:
            raise RuntimeError(f"vllm-odb check: the sampler's {where} phase failed on the device") from e


def _force(commit: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, reqs: list) -> torch.Tensor:
    """Benchmarks' trace replay: a replaying request commits its recorded count this forward
    (policies/replay.py) instead of the rule's decision; other rows keep theirs."""
    rows = [j for j, q in enumerate(reqs) if q.replay is not None]
    if not rows:
        return commit
    idx = to_device(rows, commit.device)
    counts = to_device([reqs[j].replay.count(reqs[j].block_index, reqs[j].block_step) for j in rows], commit.device)
    commit = commit.clone()
    commit[idx] = forced_commit(conf[idx], masked[idx], counts)
    return commit
