"""Patch: an FA3 pin kept on Hopper for our models (``get_flash_attn_version``,
vllm/v1/attention/backends/fa_utils.py, 0.26.0, and its name in ``flash_attn.py``).

vLLM upgrades FlashAttention from version 3 to 4 on SM90 for every diffusion model (``ModelConfig.is_diffusion``)
whenever FA4's interface file is present (vLLM's wheel ships it; its CuTe DSL,
``nvidia-cutlass-dsl``, is a vLLM 0.26 requirement), even when
``attention_config.flash_attn_version`` pins 3 (vLLM still logs its "upgrading FlashAttention 3 ->
4" line before this wrapper answers 3). The reason it gives is DiffusionGemma's per-sequence causal
mask ("dynamic_causal"), which only FA4 runs. LLaDA and Dream attend non-causally on every step (a
plain ``causal=False``), which FA3 runs; FA3 is what was measured against the Triton backend
(BENCHMARKS.md), and FA4 compiles its kernels with the CuTe DSL at start-up. So the config hook
(models/hook.py) pins 3 on Hopper where the user names no version, and for our models this wrapper
keeps that pin: when vLLM answers 4 on SM90 with the pin at 3, FA3 supported and no other upgrade
reason (head size up to 256, no sinks with a different value head size), it answers 3.
``--attention-config '{"flash_attn_version": 4}'`` still gets FA4. Every other model, device and
request gets vLLM's answer. One difference from the upstream diff (patches/11-...): with
``VLLM_BATCH_INVARIANT=1`` vLLM turns its FA4 answer into FA2, which this wrapper passes through
(FA2 on Hopper), where the diff would keep FA3.
"""

from __future__ import annotations

import logging

NAME = "fa3_hopper"
FA3_MAX_HEAD = 256  # FA3's largest head size on SM90 (vLLM upgrades past it for every model)

log = logging.getLogger(__name__)


def keeps_fa3(version, capability_major: int | None, pinned: int | None, fa3_supported: bool,
              head_size: int | None = None, head_size_v: int | None = None, has_sinks: bool = False) -> bool:
    """Whether vLLM's FA4 answer for one of our models overrode a pin at 3 for the diffusion upgrade
    alone, so FA3 serves."""
    if version != 4 or capability_major != 9 or pinned != 3 or not fa3_supported:
        return False
    if head_size is not None and head_size > FA3_MAX_HEAD:
        return False
    return not (has_sinks and head_size is not None and head_size_v is not None and head_size != head_size_v)


def wrap(get_flash_attn_version):
    from vllm_odb.patches import is_odb_model

    def odb_get_flash_attn_version(requires_alibi: bool = False, head_size: int | None = None,
                                   head_size_v: int | None = None, has_sinks: bool = False):
        version = get_flash_attn_version(requires_alibi=requires_alibi, head_size=head_size,
                                         head_size_v=head_size_v, has_sinks=has_sinks)
        if version != 4:
            return version
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        if config is None or config.model_config is None or not is_odb_model(config.model_config.hf_config):
            return version
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.fa_utils import is_fa_version_supported

        capability = current_platform.get_device_capability()
        if head_size is None:  # calls without one (graph support, AOT schedule) must agree with the impl's
            head_size = config.model_config.get_head_size()
        if keeps_fa3(version, capability.major if capability is not None else None,
                     config.attention_config.flash_attn_version, is_fa_version_supported(3),
                     head_size, head_size_v, has_sinks):
            if not getattr(odb_get_flash_attn_version, "_told", False):
                odb_get_flash_attn_version._told = True
                log.info("vllm-odb: FlashAttention 3 kept on Hopper (LLaDA/Dream attend non-causally, "
                         "no per-sequence causal mask); ask for 4 with --attention-config "
                         "'{\"flash_attn_version\": 4}'")
            return 3
        return version

    odb_get_flash_attn_version._odb_patched = True
    odb_get_flash_attn_version.__wrapped__ = get_flash_attn_version
    return odb_get_flash_attn_version


def apply() -> None:
    import sys

    from vllm.platforms import current_platform

    from vllm_odb.patches import install

    if not current_platform.is_cuda():
        return  # no FlashAttention to pin (and no reason to load its extensions)
    try:
        from vllm.v1.attention.backends import fa_utils
    except ImportError:  # a build without vLLM's FlashAttention: nothing to keep
        return

    install(fa_utils, "get_flash_attn_version", wrap)
    # flash_attn.py binds the name at its import: patch that binding too where it is already loaded
    # (a later import picks up the patched fa_utils name).
    patched = fa_utils.get_flash_attn_version
    for name in ("vllm.v1.attention.backends.flash_attn",):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "get_flash_attn_version", patched) is not patched:
            module.get_flash_attn_version = patched
