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

A benchmark may stand in its own forward (``DiffusionLM.forward_override``): the speed benchmarks'
research-code cache layout does (vllm_odb/bench/research.py). The decoders only let it refuse,
by name, a config it does not cover.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vllm_odb.checkpoint import (
    ModelSpec,
    check_weights,
    internal_to_official,
    iter_official_tensors,
    load_spec,
    official_to_internal,
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


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    if in_fp32:
        tf = t.float()
        return (tf * cos + rotate_half(tf) * sin).to(t.dtype)
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    return t * cos + rotate_half(t) * sin


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        d, hd = spec.hidden_size, spec.head_dim
        self.q_proj = nn.Linear(d, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(d, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, d, bias=False)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of ``h`` [B, Q, d] before RoPE, as [B, heads, Q, head_dim]."""
        s = self.spec
        b, q_len, _ = h.shape
        q = self.q_proj(h).view(b, q_len, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, q_len, s.num_kv_heads, s.head_dim).transpose(1, 2)
        return q, k, v

    def forward(self, h, cos, sin, mask, past=None, splice=None):
        s = self.spec
        b, q_len, _ = h.shape
        q, k, v = self.qkv(h)
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

    def forward(self, h, cos, sin, mask, past=None, splice=None):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, past, splice)
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

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = Backbone(spec)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        # A benchmark's stand-in for ``forward`` (same arguments, the model first), or None: it
        # may refuse a decoding config by name in ``check(cfg)``, which generate() calls.
        self.forward_override = None

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
        and, with ``return_kv``, the per-layer (k, v) of the whole key set (keys after RoPE)."""
        if self.forward_override is not None:
            return self.forward_override(self, input_ids, positions, key_mask, past, splice, attn_mask, return_kv)
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
        logits = self.head(h)
        return (logits, kvs) if return_kv else logits

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of the last layer's hidden states: final norm, then the LM head (or the tied embedding)."""
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.model.norm(h), head)


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
    spec = load_spec(path)
    check_weights(path, spec)  # a bad directory, truncated or mis-sized weights: one line naming the file
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
