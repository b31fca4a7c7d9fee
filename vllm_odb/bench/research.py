"""The research code's attention layout for the reference model (the speed benchmarks' baseline).

The benchmarks compare the vLLM engine against the research code (Fast-dLLM's LLaDA and Dream
model files, read for the calibration of the speed-benchmarks issue: ``python -m vllm_odb.bench
calibrate-fastdllm``). The reference engine stands in for it, so its forward must cost what theirs
costs. ``set_attention_impl(model, "research")`` attaches ``ResearchForward`` to a reference
model (``DiffusionLM.forward_override``): same weights, same logits, the research code's cost
structure:

- keys are cached before RoPE and the whole key set is rotated again in every layer of every
  forward;
- a dual-cache step writes the block's keys and values into the cache in place at the indices of
  a device-side position mask, found in every layer (``nonzero``, which waits for the GPU),
  converts queries and keys for RoPE, then slices the queries' tables at the end of that range,
  read back to the host for each bound of each slice (four more waits per layer, as there);
- for LLaDA on CUDA the attention call is compiled, as there.

The research code's bs-1 decode forward is host-bound, so these waits, which stop the host from
running ahead of the GPU, are most of its cost. It covers what the research code has (no cache,
prefix cache, dual cache); draft branches, suffix views and the feature cache run ``"plain"``
(``ResearchForward.check`` refuses them by name).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vllm_odb.reference.model import DiffusionLM, rope_tables, rotate_half

ATTENTION_IMPLS = ("plain", "research")

# Fast-dLLM's LLaDA file calls its attention kernel through torch.compile; Dream's file does not.
# At batch 1 the compiled call's dispatch (~0.5 ms, once per layer) is, with the host waits above,
# most of the gap between the research code's forward and an eager one (the calibration measured
# both: BENCHMARKS.md), so the research impl makes the same call for LLaDA. Only on CUDA, the device
# the calibration is about: on the CPU it would only add compile time to the tests. False: eager
# (the calibration's diagnostic variant).
COMPILE_RESEARCH_ATTENTION = True


def set_attention_impl(model: DiffusionLM, impl: str) -> None:
    """``"research"``: the research code's cache layout (module doc); ``"plain"``: the model's own."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
    model.forward_override = ResearchForward() if impl == "research" else None


def attention_impl(model: DiffusionLM) -> str:
    return "research" if isinstance(model.forward_override, ResearchForward) else "plain"


def key_positions(key_mask: torch.Tensor | None, batch: int, n_keys: int, device) -> torch.Tensor:
    """Positions of a whole key set: real tokens counted from 0 (left padding sits at 0), as
    generate() numbers them; without a mask, 0..n_keys-1."""
    if key_mask is None:
        return torch.arange(n_keys, device=device).expand(batch, -1)
    return (key_mask.long().cumsum(1) - 1).clamp_min(0)


class ResearchForward:
    """``DiffusionLM.forward_override`` with the research code's cache layout (module doc). Takes
    ``DiffusionLM.forward``'s arguments; ``past`` holds un-rotated keys and a dual-cache step
    writes into it."""

    def check(self, cfg) -> None:
        """The decoding configs the research code has; others raise naming the knob."""
        extra = [k for k, on in (("jump-share (ridge_rows)", cfg.jump), ("suffix_window", cfg.suffix_window),
                                 ("dcu", cfg.dcu)) if on]
        if extra:
            raise ValueError(f'attention_impl="research" models the research code\'s cache (no cache, prefix, '
                             f'dual); {", ".join(extra)} runs with attention_impl="plain"')

    def __call__(self, model: DiffusionLM, input_ids, positions, key_mask, past, splice, attn_mask, return_kv):
        b, q_len = input_ids.shape
        if attn_mask is not None:
            raise ValueError('attention_impl="research" has no attn_mask (draft branches run "plain")')
        replace = None
        if past is None:
            n_keys, pos = q_len, positions
        else:
            n_past = past[0][0].shape[2]
            start, end = splice if splice is not None else (n_past, n_past)
            if (start, end) == (n_past, n_past):  # prefix cache: append
                n_keys = n_past + q_len
            elif end - start == q_len:  # dual cache: overwrite [start, end)
                n_keys = n_past
                replace = torch.zeros((b, n_keys), dtype=torch.bool, device=input_ids.device)
                replace[:, start:end] = True
            else:
                raise ValueError(f'attention_impl="research" splices as many rows as it queries '
                                 f'(splice {splice} with {q_len} query rows)')
            pos = key_positions(key_mask, b, n_keys, input_ids.device)
        # The research code passes a mask only when some key is padding (it checks on the host).
        mask = None if key_mask is None or bool(key_mask.all()) else key_mask[:, None, None, :]
        cos, sin = rope_tables(pos, model.spec.head_dim, model.spec.rope_theta)
        h = model.model.embed_tokens(input_ids)
        kvs = []
        for i, layer in enumerate(model.model.layers):
            a, kv = _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, mask,
                               None if past is None else past[i], replace)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if return_kv:
                kvs.append(kv)
        logits = model.head(h)
        return (logits, kvs) if return_kv else logits


def _attention(attn, h, key_cos, key_sin, mask, past=None, replace=None):
    """One layer's attention. ``key_cos``/``key_sin``: RoPE tables of the whole key set [B, 1, K,
    hd]; ``past``: un-rotated (k, v); ``replace``: [B, K] bool marking the rows a dual-cache step
    overwrites (every row of the batch marks the same range); without it a ``past`` is a prefix
    and the step's rows are appended."""
    s = attn.spec
    b, q_len, _ = h.shape
    q, k, v = attn.qkv(h)
    if past is not None and replace is not None:
        pk, pv = past
        idx = replace.nonzero(as_tuple=True)[1][:q_len]  # the first row's range; waits for the GPU
        pk[:, :, idx] = k
        pv[:, :, idx] = v
        k, v = pk, pv
        end = idx.max() + 1  # the block's end, on the device
    else:
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        end = k.shape[2]
    if s.rope_in_fp32:
        qr, kr = q.float(), k.float()
    else:
        qr, kr = q, k
        key_cos, key_sin = key_cos.to(q.dtype), key_sin.to(q.dtype)

    def stop() -> int:  # as in the research code, each slice bound reads the block end back
        return int(end)

    q_cos, q_sin = key_cos[:, :, stop() - q_len:stop()], key_sin[:, :, stop() - q_len:stop()]
    q = (qr * q_cos + rotate_half(qr) * q_sin).to(q.dtype)
    kr = (kr * key_cos + rotate_half(kr) * key_sin).to(k.dtype)
    groups = s.num_heads // s.num_kv_heads
    vr = v
    if groups > 1:
        kr, vr = kr.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    attend = _compiled_sdpa() if s.arch == "llada" and q.is_cuda and COMPILE_RESEARCH_ATTENTION else _sdpa
    out = attend(q, kr, vr, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, q_len, s.num_heads * s.head_dim)
    return attn.o_proj(out), (k, v)


def _sdpa(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)


@functools.cache
def _compiled_sdpa():
    return torch.compile(_sdpa)
