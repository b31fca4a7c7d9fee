"""Patch: warm-up prompt ids inside the vocabulary (``warmup_kernels`` as ``gpu_worker`` calls it,
vllm/v1/worker/gpu/warmup.py, 0.26.0).

The V2 runner's kernel warm-up prefills dummy requests whose prompt ids are ``range(decode_query_len
+ 1)``: ids up to the decode query length, whatever the vocabulary. A jump-share engine's decode
query is its canvas width (``ridge_rows``, 251 by default), so a
checkpoint with fewer token rows than that (the basic suite's tiny ones have 128) indexes past its
embedding table and the engine dies at start-up. For our models the wrapper hands the warm-up's
new requests ids taken modulo the vocabulary size (the warm-up times kernels: which ids it feeds
does not matter). Other models get vLLM's warm-up unchanged.
"""

from __future__ import annotations

NAME = "warmup_ids"
_WARMUP_PREFIX = "_warmup_"  # vLLM's warm-up request ids


def in_vocab(scheduler_output, vocab_size: int) -> None:
    """Map the prompt ids of the warm-up's new requests into ``[0, vocab_size)`` in place."""
    for req in scheduler_output.scheduled_new_reqs or ():
        if not str(req.req_id).startswith(_WARMUP_PREFIX):
            continue
        for field in ("prompt_token_ids", "prefill_token_ids"):
            ids = getattr(req, field, None)
            if ids is not None and any(t >= vocab_size for t in ids):
                setattr(req, field, [t % vocab_size for t in ids])


def wrap(warmup_kernels):
    from vllm_odb.patches import is_odb_model

    def odb_warmup_kernels(model_runner, worker_execute_model, worker_sample_tokens, *args, **kwargs):
        config = model_runner.model_config
        if not is_odb_model(config.hf_config):
            return warmup_kernels(model_runner, worker_execute_model, worker_sample_tokens, *args, **kwargs)
        vocab_size = config.get_vocab_size()

        def execute_model(scheduler_output, *a, **kw):
            in_vocab(scheduler_output, vocab_size)
            return worker_execute_model(scheduler_output, *a, **kw)

        return warmup_kernels(model_runner, execute_model, worker_sample_tokens, *args, **kwargs)

    odb_warmup_kernels._odb_patched = True
    odb_warmup_kernels.__wrapped__ = warmup_kernels
    return odb_warmup_kernels


def apply() -> None:
    from vllm.v1.worker import gpu_worker

    from vllm_odb.patches import install

    install(gpu_worker, "warmup_kernels", wrap)
