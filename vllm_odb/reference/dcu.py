"""Dynamic-dLLM's dynamic cache updating (DCU) in the reference engine.

``DCUForward`` stands in for the model in the uncached (full-sequence) loop: same call, same
logits shape, but after its first forward each layer >= 1 recomputes only the tokens that
``policies.dcu`` selects and reuses the cached keys / attention / FFN outputs of the others:

    forward 0: every layer on every token; cache K, V, attention and FFN outputs per layer
    later forwards, per layer:
        layer 0: every token (its input, the embedding, changes exactly where tokens changed)
        layer >= 1: V of every response token (to measure change; the prompt's V only on a
            prompt refresh), dissimilarity 1 - cos(V, cached V), the layer's budget from the
            previous forward's layer scores, window + top-budget tokens (+ the prompt on a
            prompt refresh) recompute K, attention and FFN; the layer's score is recorded

The key token (window centre) is the highest response column committed since the previous
forward, read off the ids. State lives across blocks, as in the paper; rows are independent, so
a request decodes the same alone and in a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_odb.policies.config import DecodeConfig
from vllm_odb.policies.dcu import dissimilarity, key_window, layer_budgets, select_tokens
from vllm_odb.reference.model import DiffusionLM, LayerCache, rope_tables


class DCUForward:
    """Callable like ``DiffusionLM`` on the full sequence: (ids, positions, key mask) -> logits,
    plus ``active`` [B]: the rows that take part in this forward. ``plen``: the (padded) prompt
    width; columns from ``plen`` on are the response. A row that sits a forward out (its block is
    done while others decode) keeps its cached state untouched, so it decodes as it would alone."""

    def __init__(self, model: DiffusionLM, cfg: DecodeConfig, plen: int, mask_id: int):
        self.model, self.cfg, self.plen, self.mask_id = model, cfg, plen, mask_id
        self.caches: list[LayerCache] | None = None
        self.scores: torch.Tensor | None = None  # [B, n_layers - 1]: each row's last layer scores
        self.has_scores: torch.Tensor | None = None  # [B] bool
        self.prev_ids: torch.Tensor | None = None  # ids at each row's last forward
        self.key: torch.Tensor | None = None  # [B] response column of the key token
        self.count: torch.Tensor | None = None  # [B] forwards each row took part in
        self.recomputed: torch.Tensor | None = None  # [B] token-layers recomputed (real tokens)
        self.dense: torch.Tensor | None = None  # [B] token-layers a full forward would compute

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, key_mask: torch.Tensor,
                 active: torch.Tensor | None = None) -> torch.Tensor:
        model, cfg, plen = self.model, self.cfg, self.plen
        spec = model.spec
        batch, width = ids.shape
        n_resp = width - plen
        layers = model.model.layers
        dev = ids.device
        full = self.caches is None
        if full:  # every row starts with a full forward, whatever ``active`` says
            active = torch.ones(batch, dtype=torch.bool, device=dev)
            zeros = torch.zeros(batch, dtype=torch.long, device=dev)
            self.key, self.count, self.recomputed, self.dense = zeros, zeros.clone(), zeros.clone(), zeros.clone()
            self.scores = torch.zeros((batch, len(layers) - 1), device=dev)
            self.has_scores = torch.zeros(batch, dtype=torch.bool, device=dev)
            refresh = active
        else:
            active = torch.ones(batch, dtype=torch.bool, device=dev) if active is None else active
            interval = cfg.dcu_prompt_interval
            refresh = active & (self.count % interval == 0) if interval else torch.zeros_like(active)
            new = (self.prev_ids[:, plen:] == self.mask_id) & (ids[:, plen:] != self.mask_id)
            latest = torch.where(new, torch.arange(n_resp, device=dev)[None], -1).max(1).values
            self.key = torch.where(active & (latest >= 0), latest, self.key)
            window = key_window(self.key, cfg.dcu_window, n_resp)
            budgets = torch.where(self.has_scores[:, None], layer_budgets(self.scores, cfg.dcu_layer_budget * len(layers)),
                                  cfg.dcu_layer_budget)
        cos, sin = rope_tables(pos, spec.head_dim, spec.rope_theta)
        mask = key_mask[:, None, None, :]
        rows = active[:, None].expand(batch, width)
        h = model.model.embed_tokens(ids)
        caches, scores = [], []
        for i, layer in enumerate(layers):
            xn = layer.input_layernorm(h)
            whole = full or i == 0
            v_from = 0 if whole or bool(refresh.any()) else plen
            v = layer.self_attn.v_proj(xn[:, v_from:]).view(batch, width - v_from, spec.num_kv_heads, spec.head_dim)
            v = v.transpose(1, 2)
            if full:
                cache = LayerCache(torch.empty_like(v), torch.empty_like(v), torch.empty_like(h), torch.empty_like(h))
            else:
                cache = self.caches[i]
            if whole:
                chosen = rows
            else:
                old = cache.v[:, :, plen:].transpose(1, 2).flatten(2)
                d = dissimilarity(v[:, :, plen - v_from:].transpose(1, 2).flatten(2), old)
                scores.append(d.mean(1))
                resp = select_tokens(d, window, budgets[:, i - 1])
                chosen = torch.cat([refresh[:, None].expand(batch, plen), resp], 1) & rows
            # New values: every response token of an active row, and every token it recomputes.
            write = chosen.clone()
            write[:, plen:] = rows[:, plen:]
            cache.v[:, :, v_from:] = torch.where(write[:, None, v_from:, None], v, cache.v[:, :, v_from:])
            idx, valid = _compact(chosen)
            h = layer.forward_selected(h, xn, cos, sin, mask, cache, idx, valid)
            self.recomputed += (chosen & key_mask).sum(1)
            caches.append(cache)
        self.dense += torch.where(active, len(layers) * key_mask.sum(1), 0)
        self.caches = caches
        if scores:
            self.scores = torch.where(active[:, None], torch.stack(scores, 1), self.scores)
            self.has_scores |= active
        self.prev_ids = ids.clone() if full else torch.where(active[:, None], ids, self.prev_ids)
        self.count += active
        h = model.model.norm(h)
        head = model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        return F.linear(h, head)

    def stats(self) -> dict:
        """Per request: ``dcu_recomputed`` (token-layers recomputed) and ``dcu_dense`` (token-layers a
        full-sequence forward would have computed), summed over the forwards it took part in."""
        return {"dcu_recomputed": self.recomputed.tolist(), "dcu_dense": self.dense.tolist()}


def _compact(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected columns first, in order: idx [B, U] and valid [B, U], U = the most any row chose."""
    count = chosen.sum(1)
    order = (~chosen).to(torch.int8).argsort(dim=1, stable=True)[:, :max(1, int(count.max()))]
    return order, torch.arange(order.shape[1], device=chosen.device)[None] < count[:, None]
