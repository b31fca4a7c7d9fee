"""The vLLM engine's decode loop on CPU, with the reference model standing in for vLLM's forward.

What runs is the engine's own code: ``RequestTable`` (requests, knobs, stop strings),
``ODBSampler`` (decode, advance, emit, refresh, ALP, drafts), ``CacheRefresh`` (the refresh side
forward's jobs) and ``JumpPlan``. What is emulated is what vLLM and the GPU provide: the
scheduler (one request at a time, a prefill step, then decode steps until an emitted block holds
an end id, as vLLM's stop check does; each decode step gives every request the canvas slots
``knobs.step_width`` allows after a step of the previous step's batch, as vLLM's async scheduler
does with the table patches/scheduler_lookahead.py sets), the forward of a decode step (the reference model on the
window vLLM is fed, ``req_states.draft_tokens``, over the keys the last refresh wrote: the dual
cache; jump-share plans' rows with the layout's mask, as ``BranchAttention`` computes them) and
the refresh forward (the reference model over the job's sequence, keeping its keys and values as
the request's cache). So a response and its NFE must equal the reference loop's, as on the GPU
(``bench vllm-parity``), without the GPU.

A request the sampler reports failed (``SamplerOutput.num_nans``) is ended with an error as vLLM's
scheduler ends it (patches/request_errors.py), ``error_lag`` steps later (async scheduling has
the next step scheduled before it reads this one's output).
"""

from __future__ import annotations

import types

import numpy as np
import torch

from vllm_odb.engine.model_state import CacheRefresh, PagedCache
from vllm_odb.engine.requests import RequestTable
from vllm_odb.engine.sampler import ODBSampler

_TINY: dict = {}


def tiny_checkpoint(fmt: str):
    """The shipped tiny ``fmt`` checkpoint on the CPU, loaded once per test session."""
    from pathlib import Path

    from vllm_odb.reference.loader import load_checkpoint

    if fmt not in _TINY:
        _TINY[fmt] = load_checkpoint(str(Path(__file__).resolve().parents[1] / "checkpoints" / f"tiny-{fmt}"))
    return _TINY[fmt]



class EmulatedEngine:
    def __init__(self, ckpt, engine_cfg, slots: int = 2, max_model_len: int = 512):
        self.model, self.special = ckpt.model, ckpt.special
        self.shift = ckpt.model.spec.logits_shift
        self.table = RequestTable(slots, max_model_len, engine_cfg, self.shift, ckpt.special.mask_id,
                                  ckpt.special.eos_id, [(e,) for e in ckpt.special.end_ids], "cpu",
                                  tokenizer=lambda: ckpt.tokenizer)
        self.width = self.table.width
        kbs = 4
        self.paged = PagedCache(kernel_block_size=kbs)
        # Each request's own range of kernel blocks: prompt + canvas up to max_model_len, and the
        # widest step's query past it.
        self.blocks_per_slot = -(-(max_model_len + self.width + self.table.block) // kbs)
        self.slot_of_kv = lambda kv_slot: int(kv_slot) // (self.blocks_per_slot * kbs)
        stand_in = types.SimpleNamespace(model=types.SimpleNamespace(refresh_forward=self._refresh_forward),
                                         compute_logits=lambda h: h)
        self.draft_tokens = torch.zeros(slots, self.width, dtype=torch.long)
        base = types.SimpleNamespace(sampling_states=None, req_states=types.SimpleNamespace(draft_tokens=self.draft_tokens))
        self.sampler = ODBSampler(self.table, CacheRefresh(stand_in, self.paged), base, 4096)
        self.kv: dict[int, list] = {}  # each request's keys and values as its last refresh wrote them
        self.step_slots = self.width  # canvas slots of each request in the next decode step
        self.slots_seen: list[int] = []  # the decode steps' slots per request, in order

    def generate(self, prompts: list[list[int]], sampling_params, error_lag: int = 1) -> list[list[int] | None]:
        """The requests through the engine at once (the first step prefills them all): each one's
        response tokens as vLLM emits them (up to and without the first end id), or None for a
        request that ended with an error. ``sampling_params``: one for all, or one per prompt.
        ``self.stats``: what the engine's metrics counted for them, summed; ``self.errors``: the
        slots that ended with an error, ``self.emitted_tokens``: every request's emitted tokens,
        and ``self.emitted_after_error``: tokens any of them emitted after the step that reported
        it."""
        before = dict(self.table.counters.totals)
        slots = list(range(len(prompts)))
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        for s, p, sp in zip(slots, prompts, params):
            self.table.add(s, f"r{s}", p, None, sp)
        out = self._step(slots, prefill=True)
        failing = {s: error_lag for row, s in enumerate(slots) if out.num_nans is not None and out.num_nans[row] > 0}
        emitted: dict[int, list[int]] = {s: [] for s in slots}
        self.errors, self.emitted_after_error = set(), 0
        ends = set(self.special.end_ids)
        active = list(slots)
        for _ in range(4 * max(self.table.get(s).cfg.gen_length for s in slots) + 8):
            out = self._step(active, prefill=False)
            for row, s in enumerate(active):
                new = out.sampled_token_ids[row, :int(out.num_sampled[row])].tolist()
                emitted[s] += new
                if s in failing:
                    self.emitted_after_error += len(new)
                elif out.num_nans is not None and out.num_nans[row] > 0:
                    failing[s] = error_lag
            for s in [s for s in active if s in failing and failing[s] <= 0]:  # the scheduler's error finish
                self.errors.add(s)
                self.table.remove(f"r{s}")
                active.remove(s)
            for s in failing:
                failing[s] -= 1
            for s in [s for s in active if s not in failing and ends & set(emitted[s])]:  # vLLM's stop check
                self.table.remove(f"r{s}")
                active.remove(s)
            if not active:
                break
        else:
            raise AssertionError("a request never emitted an end id")
        # What the engine's metrics counted (forwards a request takes after the block that ends it
        # are not: engine/requests.py ``RequestTable.ended``).
        self.stats = {k: v - before[k] for k, v in self.table.counters.totals.items()}
        self.emitted_tokens = [emitted[s] for s in slots]
        return [None if s in self.errors else e[:min(e.index(t) for t in ends if t in e)]
                for s, e in emitted.items()]

    def _tables(self, slots: list[int]) -> None:
        """Each batch row's block table: its request's own range of blocks."""
        self.paged.block_tables = torch.stack([torch.arange(s * self.blocks_per_slot, (s + 1) * self.blocks_per_slot)
                                               for s in slots])

    def _step(self, slots: list[int], prefill: bool):
        self._tables(slots)
        n = len(slots)
        reqs = [self.table.get(s) for s in slots]
        if prefill:
            lens = np.array([q.start for q in reqs])
            batch = types.SimpleNamespace(
                num_reqs=n, idx_mapping_np=np.array(slots), num_draft_tokens=0, cu_num_logits_np=np.zeros(n + 1, int),
                is_prefilling_np=np.ones(n, bool), num_scheduled_tokens=lens, num_computed_prefill_tokens_np=np.zeros(n),
                prefill_len_np=lens, num_tokens=int(lens.sum()), req_ids=[q.req_id for q in reqs])
            self.step_slots = self.table.step_width(n)
            return self.sampler(torch.zeros(n, 1), batch)
        k, self.step_slots = self.step_slots, self.table.step_width(n)
        self.slots_seen.append(k)
        logits = torch.cat([self._window_logits(s, q, k) for s, q in zip(slots, reqs)])
        counts = np.full(n, k)
        batch = types.SimpleNamespace(
            num_reqs=n, idx_mapping_np=np.array(slots), num_draft_tokens=int(counts.sum()),
            cu_num_logits_np=np.concatenate([[0], np.cumsum(counts)]), is_prefilling_np=np.zeros(n, bool),
            num_scheduled_tokens=counts, num_computed_prefill_tokens_np=np.zeros(n), prefill_len_np=np.zeros(n),
            num_tokens=int(counts.sum()), req_ids=[q.req_id for q in reqs])
        return self.sampler(logits, batch)

    def _refresh_forward(self, ids, pos, attend):
        """The refresh side forward: the reference model over each job's sequence, whose keys and
        values become that request's cache (in the order of its cache slots)."""
        out = []
        for a, b in attend.bounds:
            keys = torch.ones((1, b - a), dtype=torch.bool)
            logits, kv = self.model(ids[None, a:b], pos[None, a:b], keys, return_kv=True)
            self.kv[self.slot_of_kv(attend.slots[a])] = kv
            out.append(logits[0])
        return torch.cat(out)

    def _window_logits(self, slot: int, q, k: int) -> torch.Tensor:
        """A decode step's forward for one request: its ``k`` rows as vLLM feeds them (the
        draft tokens), over the dual cache's keys ``[0, q.keys)`` with the window's rows spliced
        in. A jump-share plan's rows carry their layout's positions and mask; padding rows decide
        nothing and get zeros."""
        if q.finished:  # EOS blocks: the sampler reads none of these rows
            return torch.zeros(k, self.model.spec.vocab_size)
        window = self.table.window
        q0 = q.start - self.shift
        kv = [(k[:, :, :q.keys], v[:, :, :q.keys]) for k, v in self.kv[slot]]
        tokens = self.draft_tokens[slot]
        if q.plan is None:
            rows, pos, attn = window, torch.arange(q0, q0 + window), None
        else:
            rows, pos = q.plan.num_rows, q0 + q.plan.offsets
            attn = torch.ones((1, rows, q.keys - window + rows), dtype=torch.bool)
            attn[0, :, q0:q0 + rows] = q.plan.attn
        keys = torch.ones((1, q.keys - window + rows), dtype=torch.bool)
        logits = self.model(tokens[None, :rows], pos[None], keys, past=kv, splice=(q0, q0 + window), attn_mask=attn)[0]
        assert rows <= k, f"a plan of {rows} rows in a step of {k} slots"
        return torch.cat([logits, torch.zeros(k - rows, logits.shape[-1])])
