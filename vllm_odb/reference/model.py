"""LLaDA and Dream forward passes in plain PyTorch (the reference engine's models).

One module tree serves both architectures; they differ only by ``ModelSpec`` flags (q/k/v bias,
GQA, RoPE precision, the Dream logit shift which the decoder applies). Parameter names are the
Hugging Face Llama layout; ``vllm_odb.checkpoint`` maps the official names onto it.

Attention is bidirectional. A forward may be given the keys/values of positions computed earlier
(``past``) and a ``splice`` range: the new keys/values replace ``past[start:end]``. That one
operation expresses every cache mode of the decoders:
- no cache: no past;
- prefix cache: past = prefix, splice = (len, len), i.e. append;
- dual cache: past = whole sequence, splice = the block being recomputed;
- draft branches (ODB): past = whole sequence, splice = the block, several branches as new rows,
  with an ``attn_mask`` keeping each branch to its own rows.

Dynamic-dLLM's feature cache uses a second, per-layer path (``DecoderLayer.forward_selected``):
a layer recomputes keys, attention and FFN for selected tokens only and reuses the cached
outputs of the others (``LayerCache``); reference/dcu.py drives it.

``attention_impl`` chooses how the cache is kept and attended (same logits either way):
- ``"plain"`` (default): keys are cached after RoPE; a step rotates its own rows only and builds
  the key set by concatenation.
- ``"research"``: the cost structure of the research code the benchmarks compare against
  (Fast-dLLM's LLaDA and Dream model files, read for the calibration of the speed-benchmarks
  issue, see scripts/calibrate_fastdllm.py). Keys are cached before RoPE and the whole key set is
  rotated again in every layer of every forward; a dual-cache step writes the block's keys and
  values into the cache in place at the indices of a device-side position mask, found in every
  layer (``nonzero``, which waits for the GPU), converts queries and keys for RoPE, then slices
  the queries' tables at the end of that range, read back to the host for each bound of each
  slice (four more waits per layer, as there); for LLaDA on CUDA the attention call is compiled,
  as there. The research code's bs-1 decode forward is host-bound, so these waits, which stop
  the host from running ahead of the GPU, are most of its cost. It covers what the research code
  has (no cache, prefix cache, dual cache); draft branches, suffix views and the feature cache
  run ``"plain"`` only.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_odb.checkpoint import (
    ModelSpec,
    internal_to_official,
    iter_official_tensors,
    official_to_internal,
    read_config,
)

KV = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, cast back, then scale (the order both official models use).
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, 1, Q, head_dim] in fp32 for absolute ``positions`` [B, Q]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    if in_fp32:
        tf = t.float()
        return (tf * cos + _rotate_half(tf) * sin).to(t.dtype)
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    return t * cos + _rotate_half(t) * sin


ATTENTION_IMPLS = ("plain", "research")


def key_positions(key_mask: torch.Tensor | None, batch: int, n_keys: int, device) -> torch.Tensor:
    """Positions of a whole key set: real tokens counted from 0 (left padding sits at 0), as
    generate() numbers them; without a mask, 0..n_keys-1."""
    if key_mask is None:
        return torch.arange(n_keys, device=device).expand(batch, -1)
    return (key_mask.long().cumsum(1) - 1).clamp_min(0)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d, hd = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(d, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, d, bias=False)

    def forward(self, h, cos, sin, mask, past=None, splice=None):
        s = self.spec
        b, q_len, _ = h.shape
        q = self.q_proj(h).view(b, q_len, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin, s.rope_in_fp32)
        k = apply_rope(k, cos, sin, s.rope_in_fp32)
        if past is not None:
            pk, pv = past
            start, end = splice if splice is not None else (pk.shape[2], pk.shape[2])
            k = torch.cat([pk[:, :, :start], k, pk[:, :, end:]], dim=2)
            v = torch.cat([pv[:, :, :start], v, pv[:, :, end:]], dim=2)
        groups = s.num_heads // s.num_kv_heads
        kr = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        vr = v.repeat_interleave(groups, dim=1) if groups > 1 else v
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=False)
        out = out.transpose(1, 2).reshape(b, q_len, s.num_heads * s.head_dim)
        return self.o_proj(out), (k, v)

    def forward_research(self, h, key_cos, key_sin, mask, past=None, replace=None):
        """``attention_impl="research"`` (module docstring). ``key_cos``/``key_sin``: RoPE tables
        of the whole key set [B, 1, K, hd]; ``past``: un-rotated (k, v); ``replace``: [B, K] bool
        marking the rows a dual-cache step overwrites (every row of the batch marks the same
        range); without it a ``past`` is a prefix and the step's rows are appended."""
        s = self.spec
        b, q_len, _ = h.shape
        q = self.q_proj(h).view(b, q_len, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
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
        q = (qr * q_cos + _rotate_half(qr) * q_sin).to(q.dtype)
        kr = (kr * key_cos + _rotate_half(kr) * key_sin).to(k.dtype)
        groups = s.num_heads // s.num_kv_heads
        vr = v
        if groups > 1:
            kr, vr = kr.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attend = _compiled_attention() if s.arch == "llada" and q.is_cuda and COMPILE_RESEARCH_ATTENTION else _attention
        out = attend(q, kr, vr, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, q_len, s.num_heads * s.head_dim)
        return self.o_proj(out), (k, v)


def _attention(q, k, v, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)


# Fast-dLLM's LLaDA file calls its attention kernel through torch.compile; Dream's file does not.
# At batch 1 the compiled call's dispatch (~0.5 ms, once per layer) is, with the host waits above,
# most of the gap between the research code's forward and an eager one (the calibration measured
# both: BENCHMARKS.md), so the research impl makes the same call for LLaDA. Only on CUDA, the device the calibration is about: on the CPU it
# would only add compile time to the tests. False: eager (the calibration's diagnostic variant).
COMPILE_RESEARCH_ATTENTION = True


@functools.cache
def _compiled_attention():
    return torch.compile(_attention)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class LayerCache:
    """One layer's features of every token: post-RoPE keys and values [B, Hkv, T, hd], attention
    and FFN outputs [B, T, d] (the residual deltas)."""

    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor
    ffn: torch.Tensor


def _write(dst: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, src: torch.Tensor, dim: int) -> None:
    """dst[b, .., idx[b, u], ..] = src[b, .., u, ..] for the valid (b, u); ``dim`` is the token dim."""
    bi, ui = valid.nonzero(as_tuple=True)
    ti = idx[bi, ui]
    if dim == 1:
        dst[bi, ti] = src[bi, ui]
    else:
        dst[bi, :, ti] = src[bi, :, ui]


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, h, cos, sin, mask, past=None, splice=None, research=False, replace=None):
        """With ``research``, attention is ``Attention.forward_research``: ``cos``/``sin`` are
        the whole key set's tables and ``replace`` stands for ``splice``."""
        xn = self.input_layernorm(h)
        if research:
            a, kv = self.self_attn.forward_research(xn, cos, sin, mask, past, replace)
        else:
            a, kv = self.self_attn(xn, cos, sin, mask, past, splice)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), kv

    def forward_selected(self, h, xn, cos, sin, mask, cache: LayerCache, idx, valid):
        """The layer on every token of ``h`` [B, T, d] while recomputing only the selected ones.

        ``xn`` = input_layernorm(h); ``cache.v`` already holds this step's values (the caller
        recomputes them first: it compares them with the old ones to choose). ``idx`` [B, U]:
        token columns to recompute, ``valid`` [B, U] which of them are real (the rest is padding,
        computed and dropped). Their keys, attention and FFN outputs are recomputed and written
        into ``cache``; every other token reuses its cached keys and outputs. Selected queries
        attend to all keys. With every token selected this is ``forward`` exactly."""
        s = self.self_attn.spec
        b, u = idx.shape
        att = self.self_attn
        xs = xn.gather(1, idx[:, :, None].expand(-1, -1, xn.shape[2]))
        cs = cos.gather(2, idx[:, None, :, None].expand(-1, 1, -1, cos.shape[3]))
        sn = sin.gather(2, idx[:, None, :, None].expand(-1, 1, -1, sin.shape[3]))
        q = apply_rope(att.q_proj(xs).view(b, u, s.num_heads, s.head_dim).transpose(1, 2), cs, sn, s.rope_in_fp32)
        k = apply_rope(att.k_proj(xs).view(b, u, s.num_kv_heads, s.head_dim).transpose(1, 2), cs, sn, s.rope_in_fp32)
        _write(cache.k, idx, valid, k, 2)
        groups = s.num_heads // s.num_kv_heads
        kr = cache.k.repeat_interleave(groups, dim=1) if groups > 1 else cache.k
        vr = cache.v.repeat_interleave(groups, dim=1) if groups > 1 else cache.v
        out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, is_causal=False)
        _write(cache.attn, idx, valid, att.o_proj(out.transpose(1, 2).reshape(b, u, s.num_heads * s.head_dim)), 1)
        h = h + cache.attn
        hs = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[2]))
        _write(cache.ffn, idx, valid, self.mlp(self.post_attention_layernorm(hs)), 1)
        return h + cache.ffn


class Backbone(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DiffusionLM(nn.Module):
    """A bidirectional transformer returning raw (unshifted) logits."""

    def __init__(self, spec: ModelSpec, attention_impl: str = "plain"):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.attention_impl = attention_impl

    @property
    def attention_impl(self) -> str:
        return self._attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        if value not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {value!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        self._attention_impl = value

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        past: KV | None = None,
        splice: tuple[int, int] | None = None,
        attn_mask: torch.Tensor | None = None,
        return_kv: bool = False,
    ):
        """input_ids, positions: [B, Q]. key_mask: [B, K] (True = a real key) over the key set
        after splicing; attn_mask: [B or 1, Q, K] (True = may attend). Returns logits [B, Q, V]
        and, with ``return_kv``, the per-layer (k, v) of the whole key set (keys after RoPE; with
        ``attention_impl="research"`` before it, and a dual-cache step writes into ``past``)."""
        if self._attention_impl == "research":
            return self._forward_research(input_ids, positions, key_mask, past, splice, attn_mask, return_kv)
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
        if attn_mask is not None:
            mask = attn_mask[:, None] if mask is None else mask & attn_mask[:, None]
        cos, sin = rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)
        h = self.model.embed_tokens(input_ids)
        kvs: KV = []
        for i, layer in enumerate(self.model.layers):
            h, kv = layer(h, cos, sin, mask, None if past is None else past[i], splice)
            if return_kv:
                kvs.append(kv)
        return self._head(h, kvs if return_kv else None)

    def _head(self, h: torch.Tensor, kvs: KV | None):
        h = self.model.norm(h)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, head)
        return logits if kvs is None else (logits, kvs)

    def _forward_research(self, input_ids, positions, key_mask, past, splice, attn_mask, return_kv):
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
        cos, sin = rope_tables(pos, self.spec.head_dim, self.spec.rope_theta)
        h = self.model.embed_tokens(input_ids)
        kvs: KV = []
        for i, layer in enumerate(self.model.layers):
            h, kv = layer(h, cos, sin, mask, None if past is None else past[i], research=True, replace=replace)
            if return_kv:
                kvs.append(kv)
        return self._head(h, kvs if return_kv else None)


def init_weights(model: DiffusionLM, std: float = 0.02, seed: int | None = None) -> None:
    """Normal(0, std) for matrices, ones for norms, zeros for biases (used by the trainer)."""
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> DiffusionLM:
    """Build the reference model of an official-format checkpoint directory and load it by name."""
    spec = ModelSpec.from_config(read_config(path))
    with torch.device("meta"):
        model = DiffusionLM(spec)
    model = model.to_empty(device=device).to(dtype)
    state = {official_to_internal(spec.arch, n): t for n, t in iter_official_tensors(path)}
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state)
    return model.eval()


def save_model(model: DiffusionLM, path: str, config: dict, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write safetensors with the official tensor names plus ``config`` as config.json."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    arch = model.spec.arch
    tensors = {internal_to_official(arch, n): t.detach().to("cpu", dtype).contiguous()
               for n, t in model.state_dict().items()}
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
