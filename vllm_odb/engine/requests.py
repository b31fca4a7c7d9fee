"""Per-request decoding state of the vLLM engine, indexed by the runner's request slot.

Host side: each request's ``DecodeConfig``, prompt length, live canvas and current block. GPU
side: ``tokens[slot]`` = prompt, committed blocks and the canvas still being decoded (masks where
undecided), the sequence the refresh forward reads and the draft slots are cut from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_odb.engine import CHECK, check, kv_release
from vllm_odb.engine.knobs import REPLAY_ARG, canvas_width, live_gen_length, request_config, request_replay
from vllm_odb.engine.metrics import COUNTERS, RequestCounters
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.host import to_device
from vllm_odb.policies.replay import Replay
from vllm_odb.policies.length import Marker
from vllm_odb.policies.streaming import window_stop

log = logging.getLogger(__name__)


@dataclass
class ODBRequest:
    req_id: str
    cfg: DecodeConfig
    prompt_len: int
    gen: int  # live canvas length (tokens), whole blocks
    start: int  # first position of the current block
    finished: bool = False  # canvas done or ended early: emits EOS blocks until vLLM stops it
    warmup: bool = False  # vLLM's warm-up or a request refused here: not counted in the metrics
    counted: bool = False  # its stats went to the metrics (when it finished, or when removed)
    plan: object = None  # jump-share: the branches of its next decode step (engine/branches.JumpPlan)
    replay: Replay | None = None  # benchmarks: forced dynamics (policies/replay.py)
    block_step: int = 0  # forwards taken in the current block
    thresholds: object = None  # APD / dynamic thresholds of the current block (policies.adaptive.BlockThresholds)
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
    def block_index(self) -> int:
        return (self.start - self.prompt_len) // self.cfg.block_length


class RequestTable:
    def __init__(self, max_num_reqs: int, max_model_len: int, engine: DecodeConfig, shift: int,
                 mask_id: int, eos_id: int, markers: list[Marker], device,
                 counters: RequestCounters | None = None):
        self.counters = counters or RequestCounters(enabled=False)
        self.engine = engine
        self.block = engine.block_length
        self.shift = shift
        self.window = engine.block_length + shift  # the base branch's query rows
        self.width = canvas_width(engine, shift)  # query rows of a decode step (vLLM's canvas)
        self.max_model_len = max_model_len
        self.mask_id = mask_id
        self.eos_id = eos_id
        self.markers = markers
        self.device = device
        # + one block of room past max_model_len for EOS fill after the last block
        self.tokens = torch.full((max_num_reqs, max_model_len + self.width + self.block), mask_id,
                                 dtype=torch.long, device=device)
        self.reqs: list[ODBRequest | None] = [None] * max_num_reqs
        self.slot_of: dict[str, int] = {}

    def add(self, slot: int, req_id: str, prompt_ids: list[int], prefill_ids: list[int] | None,
            sampling_params) -> ODBRequest:
        """A new request, or one resumed after preemption (its committed blocks come back as part of
        ``prefill_ids``; decoding continues with the next block)."""
        self.remove(req_id)
        sp = sampling_params
        warmup = req_id.startswith("_warmup_")  # vLLM's kernel warm-up: run the path, decode nothing
        replay = None
        try:
            extra = getattr(sp, "extra_args", None)
            cfg = self.engine if warmup else request_config(
                self.engine, extra, getattr(sp, "temperature", 0.0), getattr(sp, "max_tokens", None))
            replay = None if warmup else request_replay((extra or {}).get(REPLAY_ARG))
        except ValueError as e:  # validated in the front end (patches/diffusion_params.py); never
            log.error("request %s: %s; it ends without output", req_id, e)  # crash the engine
            cfg, warmup = self.engine, True
        plen = len(prompt_ids)
        ids = list(prefill_ids) if prefill_ids else list(prompt_ids)
        gen = live_gen_length(cfg, plen, self.max_model_len, self.width - self.block)
        req = ODBRequest(req_id=req_id, cfg=cfg, prompt_len=plen, gen=gen, start=len(ids), warmup=warmup,
                         replay=replay)
        req.stats["canvas_requested"] = req.stats["canvas_predicted"] = gen
        row = self.tokens[slot]
        row.fill_(self.mask_id)
        row[: len(ids)] = to_device(ids, self.device)
        self.reqs[slot] = req
        self.slot_of[req_id] = slot
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
        req.finished = True
        req.plan = None
        self.tokens[slot, req.start:] = self.eos_id
        self._count(req)  # its decoding is over; an aborted request is counted when removed

    def ended(self, slot: int) -> None:
        """The request emitted a block holding an end marker, on which vLLM stops it: its stats go
        to the metrics now (vLLM's removal reaches the worker only at the next step, which may be
        long after). Forwards it still takes (``ignore_eos``) are not counted."""
        self._count(self.reqs[slot])

    def get(self, slot: int) -> ODBRequest | None:
        return self.reqs[slot] if 0 <= slot < len(self.reqs) else None


def decode_rows(input_batch, width: int) -> np.ndarray:
    """Batch rows that run a decode step: a running request scheduled its full ``width`` canvas
    slots (not a prompt prefill chunk, nor a window the scheduler cut short)."""
    n = input_batch.num_reqs
    return np.flatnonzero(~input_batch.is_prefilling_np[:n] & (input_batch.num_scheduled_tokens[:n] == width))
