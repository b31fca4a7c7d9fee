"""Patch: per-request KV lookahead in ``Scheduler.__init__`` (vllm/v1/core/sched/scheduler.py, 0.26.0).

Fast-dLLM's dual cache keeps the keys and values of the masked suffix (the canvas after the
current block) in the cache, and the refresh forward writes them. vLLM allocates KV slots only up
to the tokens it schedules (plus a global ``num_lookahead_tokens``, 0 on the diffusion path), so
the suffix would have no slots. The wrapper makes the scheduler's KV manager allocate, for our
requests, slots up to the end of the request's canvas (prompt + live gen_length) from the first
step on; the canvas length comes from the same knob resolution the worker uses
(``engine/knobs.py``). Memory cost: the suffix KV the dual cache holds anyway. When adaptive length
prediction cuts a canvas, the blocks past the new end go back to the pool at the request's next
allocation (engine/kv_release.py).
On a jump-share engine the wrapper also sets the scheduler's per-batch-size draft counts
(``dynamic_sd_lookup``, vLLM's dynamic speculative decoding table, which the engine cannot reach
through a ``SpeculativeConfig``: it is built without one): a step of B requests schedules each
running request ``knobs.step_width(B)`` canvas slots next step, its share of the draft budget, so
the wide canvas of batch 1 narrows to the plain window as the batch grows and the engine needs no
cap on concurrency. The placeholders carry these counts only under async scheduling (the default);
without it every step is the full canvas, and the wrapper caps the running requests at
``ridge_rows // window`` (``knobs.sync_cap``; ``models/hook.py`` sizes the token budget for both).
Other models get vLLM's allocation unchanged.
"""

from __future__ import annotations

import logging

NAME = "scheduler_lookahead"
log = logging.getLogger(__name__)


def canvas_end(request, hf_config, max_model_len: int) -> int:
    """Prompt + live canvas of ``request`` (cached on it: the knobs do not change)."""
    end = getattr(request, "_odb_canvas_end", None)
    if end is None:
        from vllm_odb.engine.knobs import live_gen_length, request_config
        from vllm_odb.policies import DecodeConfig

        sp = request.sampling_params
        cfg = request_config(DecodeConfig(**hf_config.odb_engine), sp.extra_args, sp.temperature, sp.max_tokens)
        reach = hf_config.canvas_length - cfg.block_length
        gen = live_gen_length(cfg, request.num_prompt_tokens, max_model_len, reach)
        end = request.num_prompt_tokens + gen
        request._odb_canvas_end = end
    return end


def wrap_allocate_slots(manager, hf_config, max_model_len: int):
    """``manager.allocate_slots`` for our requests: slots up to the canvas end from the first step
    on, and after an ALP cut noted by the worker, the blocks past ``end + reach`` freed (``reach``:
    how far a decode step's query runs past its block, so no later step allocates them again)."""
    from vllm_odb.engine import kv_release

    allocate = manager.allocate_slots
    reach = hf_config.canvas_length - hf_config.odb_engine["block_length"]
    kv_release.listen()  # a worker in this process trims its block lists with our frees

    def allocate_slots(request, num_new_tokens, *args, num_lookahead_tokens=0, **kwargs):
        end = canvas_end(request, hf_config, max_model_len)
        cut = kv_release.take(request.request_id)
        if request.num_computed_tokens == 0:
            # Admitted, or readmitted after preemption (which freed every block): the worker
            # starts this request from its full canvas again, so does its allocation.
            request._odb_cut_end = end
        elif cut is not None and cut < getattr(request, "_odb_cut_end", end):
            # ALP cut the canvas in the worker: free the tail, and never allocate it again.
            request._odb_cut_end = cut
            kv_release.release_tail(manager, request.request_id, cut + reach)
        end = getattr(request, "_odb_cut_end", end)
        scheduled_end = request.num_computed_tokens + num_new_tokens
        extra = max(num_lookahead_tokens, end - scheduled_end)
        return allocate(request, num_new_tokens, *args, num_lookahead_tokens=extra, **kwargs)

    return allocate_slots


def step_widths(hf_config, max_num_seqs: int) -> list[int] | None:
    """vLLM's ``dynamic_sd_lookup`` for our jump-share engine: index B (1..``max_num_seqs``) the
    canvas slots of each request in the step after a step of B requests (``knobs.step_width``;
    index 0 unused). None for a plain engine (its canvas never changes)."""
    from vllm_odb.engine.knobs import step_width
    from vllm_odb.policies import DecodeConfig

    cfg = DecodeConfig(**hf_config.odb_engine)
    if not cfg.jump:
        return None
    return [step_width(cfg, hf_config.spec.logits_shift, b) for b in range(max_num_seqs + 1)]


def apply() -> None:
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_odb.patches import is_odb_model

    original_init = Scheduler.__init__
    if getattr(original_init, "_odb_patched", False):
        return

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        hf_config = self.vllm_config.model_config.hf_config
        if not is_odb_model(hf_config):
            return
        manager = self.kv_cache_manager
        manager.allocate_slots = wrap_allocate_slots(manager, hf_config, self.max_model_len)
        if self.dynamic_sd_lookup is None:
            self.dynamic_sd_lookup = step_widths(hf_config, self.scheduler_config.max_num_seqs)
        if self.dynamic_sd_lookup is not None and not isinstance(self, AsyncScheduler):
            # Without async scheduling the placeholders are the worker's full canvas every step,
            # whatever the table says: the concurrency cap of a fixed-width jump-share engine.
            from vllm_odb.engine.knobs import sync_cap
            from vllm_odb.policies import DecodeConfig

            cap = sync_cap(DecodeConfig(**hf_config.odb_engine), hf_config.spec.logits_shift)
            if self.max_num_running_reqs > cap:
                log.info("vllm-odb: jump-share engine without async scheduling: at most %d requests at once "
                         "(ridge_rows // window)", cap)
                self.max_num_running_reqs = cap

    __init__._odb_patched = True
    Scheduler.__init__ = __init__
