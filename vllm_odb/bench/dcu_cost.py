"""``python -m vllm_odb.bench dcu-cost``: does Dynamic-dLLM's DCU pay on the engine? (issue #6)

The vLLM engine decodes on Fast-dLLM's dual cache: one refresh forward per block (every token,
every layer) and then decode forwards of the block's rows against the cached keys. DCU is the
other way to avoid recomputing the whole sequence: no refresh, but every forward runs layer 0 on
every token, the value projection of every response token in every layer (to measure change),
and the rest of each layer on a window plus a budget of tokens (papers.md 4.4). Both ways make the
same number of forwards under the same commit rule (BENCHMARKS.md: `dynamic` vs `dynamic-apd`,
`dynamic-dcu` vs `fast-dllm`), so DCU pays only if

    k * dcu_step  <  refresh + (k - 1) * decode_step       (k = forwards per block)

This module times the three forwards on one model at one shape, each as a dense, static-shape
step captured in a CUDA graph (the cost an engine implementation would have, with no Python or
gather overhead of ours): ``refresh`` (the full forward), ``decode`` (block rows against the
cache, the cache slots of the block rewritten) and ``dcu`` (layer 0 in full; per later layer:
V of the response, 1 - cos dissimilarity, top-``budget`` outside the forced window, K/attention/
FFN of the chosen rows scattered into the feature cache, the residual from the cached outputs;
logits of the block rows only). ``dcu`` is checked against the full forward in
tests/test_dcu_cost.py: with every response token chosen, its block logits are the full
forward's. The reference engine's own eager DCU forward (reference/dcu.py) is timed beside it.

It also reports the feature cache's size: DCU keeps K, V, attention and FFN outputs per token
and layer, against the KV cache's K and V.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vllm_odb.checkpoint import ModelSpec
from vllm_odb.reference.model import DiffusionLM, apply_rope, init_weights, rope_tables

FORWARDS_PER_BLOCK = (1, 2, 4, 8, 16, 32)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="llada-8b", help="llada-8b / dream-7b (random weights) or a checkpoint dir")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-lengths", default="256,1024")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--dcu-window", type=int, default=32, help="Dynamic-dLLM's B_window")
    ap.add_argument("--dcu-layer-budget", type=int, default=32, help="Dynamic-dLLM's B_layer (per layer here)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--no-graphs", action="store_true", help="time eagerly (the default captures CUDA graphs)")
    ap.add_argument("--out", required=True)


def build_model(name: str, dtype: torch.dtype, device) -> DiffusionLM:
    from vllm_odb.bench.full_size import dream_7b_config, llada_8b_config
    from vllm_odb.reference.model import load_model

    configs = {"llada-8b": llada_8b_config, "dream-7b": dream_7b_config}
    if name not in configs:
        return load_model(name, dtype=dtype, device=device).eval()
    with torch.device("meta"):
        model = DiffusionLM(ModelSpec.from_config(configs[name]()))
    model = model.to(dtype).to_empty(device=device).eval()
    init_weights(model, seed=0)
    return model


def feature_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> dict:
    """Per token, all layers: the dual cache's K+V, and DCU's K+V+attention+FFN outputs."""
    kv = 2 * spec.num_kv_heads * spec.head_dim * spec.num_layers * dtype_bytes
    feats = kv + 2 * spec.hidden_size * spec.num_layers * dtype_bytes
    return {"kv_cache": kv, "dcu_features": feats, "dcu_over_kv": round(feats / kv, 2)}


class Steps:
    """The three forwards of one shape on static buffers: ``refresh()``, ``decode()``, ``dcu()``.

    ``ids`` [B, P + G] are the canvas (prompt first); the block is ``[s, s + block)``. The caches
    are filled by ``refresh()`` (K/V post-RoPE per layer, attention and FFN outputs)."""

    def __init__(self, model: DiffusionLM, ids: torch.Tensor, plen: int, s: int, block: int,
                 window: int, budget: int):
        spec = model.spec
        self.model, self.spec, self.ids, self.plen, self.s, self.e = model, spec, ids, plen, s, s + block
        b, n = ids.shape
        self.window, self.budget = window, budget
        pos = torch.arange(n, device=ids.device)[None].expand(b, n)
        self.cos, self.sin = rope_tables(pos, spec.head_dim, spec.rope_theta)
        dt, dev = model.model.embed_tokens.weight.dtype, ids.device
        shape = (b, spec.num_kv_heads, n, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(spec.num_layers)]
        self.attn = [torch.zeros((b, n, spec.hidden_size), dtype=dt, device=dev) for _ in range(spec.num_layers)]
        self.ffn = [torch.zeros_like(a) for a in self.attn]
        # The forced window: ``window`` response columns around the block's first token.
        g = n - plen
        start = min(max(s - plen - window // 2, 0), max(g - window, 0))
        self.win_cols = torch.arange(start, min(start + window, g), device=dev)
        self.win_mask = torch.zeros(g, dtype=torch.bool, device=dev)
        self.win_mask[self.win_cols] = True

    # ---- pieces -------------------------------------------------------------------------
    def _qkv(self, att, x, cos, sin):
        s = self.spec
        b, q = x.shape[:2]
        qh = apply_rope(att.q_proj(x).view(b, q, s.num_heads, s.head_dim).transpose(1, 2), cos, sin, s.rope_in_fp32)
        kh = apply_rope(att.k_proj(x).view(b, q, s.num_kv_heads, s.head_dim).transpose(1, 2), cos, sin, s.rope_in_fp32)
        return qh, kh

    def _attend(self, att, q, k, v):
        s = self.spec
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=s.num_heads != s.num_kv_heads)
        b, _, rows, _ = out.shape
        return att.o_proj(out.transpose(1, 2).reshape(b, rows, s.num_heads * s.head_dim))

    def _logits(self, h):
        m = self.model
        head = m.model.embed_tokens.weight if m.lm_head is None else m.lm_head.weight
        return F.linear(m.model.norm(h), head)

    def _full_layer(self, i, layer, h):
        att, s = layer.self_attn, self.spec
        xn = layer.input_layernorm(h)
        q, k = self._qkv(att, xn, self.cos, self.sin)
        b, n = h.shape[:2]
        v = att.v_proj(xn).view(b, n, s.num_kv_heads, s.head_dim).transpose(1, 2)
        self.k[i].copy_(k)
        self.v[i].copy_(v)
        a = self._attend(att, q, k, v)
        self.attn[i].copy_(a)
        h = h + a
        f = layer.mlp(layer.post_attention_layernorm(h))
        self.ffn[i].copy_(f)
        return h + f

    # ---- the three forwards ---------------------------------------------------------------
    def refresh(self) -> torch.Tensor:
        """Every token, every layer (vanilla's step; the dual cache's refresh); all logits."""
        h = self.model.model.embed_tokens(self.ids)
        for i, layer in enumerate(self.model.model.layers):
            h = self._full_layer(i, layer, h)
        return self._logits(h)

    def decode(self) -> torch.Tensor:
        """The dual cache's step: the block's rows against the cached keys (the block's slots
        rewritten); block logits."""
        s_, e, sp = self.s, self.e, self.spec
        h = self.model.model.embed_tokens(self.ids[:, s_:e])
        cos, sin = self.cos[:, :, s_:e], self.sin[:, :, s_:e]
        b, q = h.shape[:2]
        for i, layer in enumerate(self.model.model.layers):
            att = layer.self_attn
            xn = layer.input_layernorm(h)
            qh, kh = self._qkv(att, xn, cos, sin)
            self.k[i][:, :, s_:e] = kh
            self.v[i][:, :, s_:e] = att.v_proj(xn).view(b, q, sp.num_kv_heads, sp.head_dim).transpose(1, 2)
            h = h + self._attend(att, qh, self.k[i], self.v[i])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._logits(h)

    def dcu(self) -> torch.Tensor:
        """Dynamic-dLLM's partial forward (after a full one): layer 0 in full, later layers on
        the forced window + the top-``budget`` changed response tokens; block logits."""
        sp, plen = self.spec, self.plen
        h = self.model.model.embed_tokens(self.ids)
        b, n = h.shape[:2]
        g = n - plen
        layers = self.model.model.layers
        h = self._full_layer(0, layers[0], h)
        room = g - self.win_cols.numel()
        budget = min(self.budget, room)
        win = self.win_cols[None].expand(b, -1) + plen
        d_model = sp.hidden_size
        for i in range(1, len(layers)):
            layer, att = layers[i], layers[i].self_attn
            xn = layer.input_layernorm(h)
            v = att.v_proj(xn[:, plen:]).view(b, g, sp.num_kv_heads, sp.head_dim).transpose(1, 2)
            old = self.v[i][:, :, plen:]
            d = 1.0 - F.cosine_similarity(v.transpose(1, 2).flatten(2).float(),
                                          old.transpose(1, 2).flatten(2).float(), dim=-1)
            self.v[i][:, :, plen:] = v
            idx = win
            if budget > 0:
                top = d.masked_fill(self.win_mask[None], float("-inf")).topk(budget, dim=1).indices + plen
                idx = torch.cat([win, top], 1)
            u = idx.shape[1]
            xs = xn.gather(1, idx[:, :, None].expand(b, u, d_model))
            cs = self.cos.expand(b, -1, -1, -1).gather(2, idx[:, None, :, None].expand(b, 1, u, sp.head_dim))
            sn = self.sin.expand(b, -1, -1, -1).gather(2, idx[:, None, :, None].expand(b, 1, u, sp.head_dim))
            qh, kh = self._qkv(att, xs, cs, sn)
            self.k[i].scatter_(2, idx[:, None, :, None].expand(b, sp.num_kv_heads, u, sp.head_dim), kh)
            a = self._attend(att, qh, self.k[i], self.v[i])
            self.attn[i].scatter_(1, idx[:, :, None].expand(b, u, d_model), a)
            h = h + self.attn[i]
            f = layer.mlp(layer.post_attention_layernorm(h.gather(1, idx[:, :, None].expand(b, u, d_model))))
            self.ffn[i].scatter_(1, idx[:, :, None].expand(b, u, d_model), f)
            h = h + self.ffn[i]
        return self._logits(h[:, self.s:self.e])


def _graphed(fn):
    """Capture ``fn`` in a CUDA graph (static shapes, static buffers); return its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _median_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return round(statistics.median(out), 3)


def per_block(refresh_ms: float, decode_ms: float, dcu_ms: float) -> list[dict]:
    """Model time per block for k forwards per block: the dual cache (one refresh, k - 1 decode
    steps) against DCU (k partial forwards)."""
    rows = []
    for k in FORWARDS_PER_BLOCK:
        dual = refresh_ms + (k - 1) * decode_ms
        rows.append({"forwards_per_block": k, "dual_ms": round(dual, 3), "dcu_ms": round(k * dcu_ms, 3),
                     "dcu_over_dual": round(k * dcu_ms / dual, 3)})
    return rows


@torch.no_grad()
def measure(model: DiffusionLM, batch: int, plen: int, glen: int, block: int, window: int, budget: int,
            iters: int, graphs: bool, reference: bool) -> dict:
    from vllm_odb.policies import DecodeConfig
    from vllm_odb.reference.dcu import DCUForward

    spec = model.spec
    dev = model.model.embed_tokens.weight.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (batch, plen + glen), generator=gen)
    ids = torch.where(ids == spec.mask_token_id, ids + 1, ids).to(dev)  # the canvas as decoded text
    s = plen + (glen // 2 // block) * block  # a block in the middle of the canvas
    steps = Steps(model, ids, plen, s, block, window, budget)
    steps.refresh()
    fns = {"refresh": steps.refresh, "decode": steps.decode, "dcu": steps.dcu}
    row = {"batch": batch, "prompt_len": plen, "gen_length": glen, "block_length": block,
           "dcu_window": window, "dcu_layer_budget": budget, "graphs": graphs}
    for name, fn in fns.items():
        row[f"{name}_ms"] = _median_ms(_graphed(fn) if graphs else fn, iters)
        torch.cuda.empty_cache()
    row["per_block"] = per_block(row["refresh_ms"], row["decode_ms"], row["dcu_ms"])
    if reference:  # the reference engine's eager forwards at the same shape
        key_mask = torch.ones_like(ids, dtype=torch.bool)
        pos = torch.arange(ids.shape[1], device=dev)[None].expand_as(ids)
        _, cache = model(ids, pos, key_mask, return_kv=True)
        row["reference_decode_ms"] = _median_ms(
            lambda: model(ids[:, s:s + block], pos[:, s:s + block], key_mask, past=cache, splice=(s, s + block)), iters)
        del cache
        cfg = DecodeConfig.for_method("dynamic-dcu", gen_length=glen, block_length=block,
                                      dcu_window=window, dcu_layer_budget=budget)
        fwd = DCUForward(model, cfg, plen, spec.mask_token_id)
        fwd(ids, pos, key_mask)  # the full first forward
        row["reference_dcu_ms"] = _median_ms(lambda: fwd(ids, pos, key_mask), iters)
        del fwd
        torch.cuda.empty_cache()
    del steps
    torch.cuda.empty_cache()
    return row


def main(args) -> int:
    if not torch.cuda.is_available():
        print("dcu-cost times GPU forwards: no CUDA device here", file=sys.stderr)
        return 2
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    from vllm_odb.bench import ceilings

    ceil = ceilings.measure()
    model = build_model(args.model, dtype, "cuda")
    gens = [int(x) for x in args.gen_lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    rows = []
    for b in tqdm(batches, desc="batches", file=sys.stderr):
        for g in tqdm(gens, desc=f"batch {b}", leave=False, file=sys.stderr):
            rows.append(measure(model, b, args.prompt_len, g, args.block_length, args.dcu_window,
                                args.dcu_layer_budget, args.iters, not args.no_graphs, reference=b == 1))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_block"}), file=sys.stderr)
    out = {"model": os.path.basename(args.model.rstrip("/")), "dtype": args.dtype, "ceilings": ceil,
           "feature_bytes_per_token": feature_bytes_per_token(model.spec, torch.finfo(dtype).bits // 8),
           "command": "python -m vllm_odb.bench dcu-cost " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["dcu-cost"]
                                                                      else sys.argv[1:]),
           "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0
