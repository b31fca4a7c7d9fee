"""Patch: hand the V2 runner's block tables to our model state (``GPUModelRunner.initialize_kv_cache``
in vllm/v1/worker/gpu/model_runner.py, 0.26.0).

When adaptive length prediction cuts a canvas, the scheduler frees the request's KV blocks past
the cut (engine/kv_release.py). The runner keeps its own copy of every request's block list and
only ever appends to it, so it must drop the same blocks, or blocks allocated later (a finished
request's EOS steps) would land after stale entries that point at freed blocks. The model state
has no handle on that copy (``ModelState`` is built without the runner), and the worker-side hooks
(``prepare_attn``, the custom sampler) see only this step's gathered tables; this wrapper passes
``runner.block_tables`` to the model state once it exists. Other models: vLLM's code unchanged.
"""

from __future__ import annotations

NAME = "runner_block_tables"


def wrap(original):
    """``initialize_kv_cache`` that, after vLLM's, hands the block tables to a model state that
    takes them (ours)."""

    def initialize_kv_cache(self, kv_cache_config):
        original(self, kv_cache_config)
        attach = getattr(getattr(self, "model_state", None), "attach_block_tables", None)
        if attach is not None:
            attach(self.block_tables)
            from vllm_odb.engine import CHECK

            if CHECK:  # debugging: log every change of the runner's GPU computed counts
                from vllm_odb.engine import check

                check.probe_runner(self)

    initialize_kv_cache._odb_patched = True
    return initialize_kv_cache


def apply() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_odb.patches import install

    install(GPUModelRunner, "initialize_kv_cache", wrap)
