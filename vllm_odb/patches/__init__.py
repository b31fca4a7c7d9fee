"""Version-checked patches of vLLM internals, applied by ``vllm_odb.register()``.

Each patch names the vLLM function it wraps and why (README.md here). They are written against
vLLM 0.26.0 and refuse any other version: ``apply_all`` raises ``RuntimeError`` naming both
versions rather than patching code it was not written for. Every patch is a wrapper that falls
through to vLLM's own code for models that are not ours, so other models are unaffected; one
exception, request_body.py, turns the 500 that a non-object JSON body gets from every model's
request validation into a 400.
"""

from __future__ import annotations

SUPPORTED_VLLM = "0.26.0"

_applied: set[str] = set()


def check_vllm_version(version: str | None = None) -> None:
    if version is None:
        import vllm

        version = vllm.__version__
    if version != SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-odb patches vLLM internals written for vllm=={SUPPORTED_VLLM}; found vllm=={version}. "
            f"Install vllm=={SUPPORTED_VLLM} (pip install 'vllm=={SUPPORTED_VLLM}')."
        )


def apply_all() -> list[str]:
    """Apply every patch once per process; returns the names applied so far."""
    check_vllm_version()
    from vllm_odb.patches import (
        cudagraph_widths,
        diffusion_params,
        fa3_hopper,
        request_body,
        request_errors,
        runner_block_tables,
        scheduler_lookahead,
        speculative_odb,
        stream_errors,
        warmup_ids,
    )

    for module in (diffusion_params, request_body, scheduler_lookahead, request_errors, stream_errors,
                   runner_block_tables, speculative_odb, warmup_ids, fa3_hopper, cudagraph_widths):
        if module.NAME not in _applied:
            module.apply()
            _applied.add(module.NAME)
    return sorted(_applied)


def install(owner, attr: str, wrap) -> None:
    """Replace ``owner.attr`` with ``wrap(owner.attr)``, once: a wrapper already in place (marked
    ``_odb_patched``) is left as it is. For plain functions and methods (a ``staticmethod`` or
    ``classmethod`` would lose its wrapper)."""
    current = getattr(owner, attr)
    if getattr(current, "_odb_patched", False):
        return
    patched = wrap(current)
    patched._odb_patched = True
    setattr(owner, attr, patched)


def is_odb_model(hf_config) -> bool:
    """Our models carry the resolved engine knobs (set by models/hook.py)."""
    return getattr(hf_config, "odb_engine", None) is not None
