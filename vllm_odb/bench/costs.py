"""Per-forward cost model of a LLaDA / Dream forward: the FLOPs it computes and the bytes it
streams, for the roofline and for the weight-streaming floor of a memory-bound decode step."""

from __future__ import annotations

from vllm_odb.checkpoint import ModelSpec


def weight_bytes(spec: ModelSpec, itemsize: int = 2) -> int:
    """Bytes a forward streams from its weights: every linear layer and the LM head (embedding
    rows are gathered, not streamed)."""
    d, hd = spec.hidden_size, spec.head_dim
    attn = d * (spec.num_heads * hd) * 2 + d * (spec.num_kv_heads * hd) * 2
    mlp = 3 * d * spec.intermediate_size
    return (spec.num_layers * (attn + mlp) + spec.vocab_size * d) * itemsize


def kv_bytes(spec: ModelSpec, kv_tokens: int, itemsize: int = 2) -> int:
    """Bytes of K and V that ``kv_tokens`` keys hold over all layers."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * kv_tokens * itemsize


def forward_flops(spec: ModelSpec, tokens: int, kv_tokens: int | None = None) -> float:
    """FLOPs of a forward over ``tokens`` query rows attending to ``kv_tokens`` keys (default:
    the rows themselves, a refresh): linear layers (the LM head excluded: the engines project only
    the rows they decide from) plus QK^T and PV."""
    d, hd = spec.hidden_size, spec.head_dim
    linear = spec.num_layers * (d * spec.num_heads * hd * 2 + d * spec.num_kv_heads * hd * 2
                                + 3 * d * spec.intermediate_size)
    keys = tokens if kv_tokens is None else kv_tokens
    attn = spec.num_layers * 4 * tokens * keys * spec.num_heads * hd
    return 2 * linear * tokens + attn
