"""Patch: per-request KV lookahead in ``Scheduler.__init__`` (vllm/v1/core/sched/scheduler.py, 0.26.0).

Fast-dLLM's dual cache keeps the keys and values of the masked suffix (the canvas after the
current block) in the cache, and the refresh forward writes them. vLLM allocates KV slots only up
to the tokens it schedules (plus a global ``num_lookahead_tokens``, 0 on the diffusion path), so
the suffix would have no slots. The wrapper makes the scheduler's KV manager allocate, for our
requests, slots up to the end of the request's canvas (prompt + live gen_length) from the first
step on; the canvas length comes from the same knob resolution the worker uses
(``engine/knobs.py``). Memory cost: the suffix KV the dual cache holds anyway.
Other models get vLLM's allocation unchanged.
"""

from __future__ import annotations

NAME = "scheduler_lookahead"


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


def apply() -> None:
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
        allocate = manager.allocate_slots
        max_model_len = self.max_model_len

        def allocate_slots(request, num_new_tokens, *args, num_lookahead_tokens=0, **kwargs):
            end = canvas_end(request, hf_config, max_model_len)
            scheduled_end = request.num_computed_tokens + num_new_tokens
            extra = max(num_lookahead_tokens, end - scheduled_end)
            return allocate(request, num_new_tokens, *args, num_lookahead_tokens=extra, **kwargs)

        manager.allocate_slots = allocate_slots

    __init__._odb_patched = True
    Scheduler.__init__ = __init__
