"""A vLLM engine step on CPU for tests: the real ``ODBSampler``, ``RequestTable``, ``CacheRefresh``
and ``PagedCache``, with stand-ins for what vLLM's runner provides (the model, block tables, the
batch). Tests drive it only through the runner's entry points: ``table.add`` (the model state's
``add_request``) and ``sampler(logits, input_batch)``."""

from __future__ import annotations

import types

import numpy as np
import torch

from vllm_odb.engine.model_state import CacheRefresh, PagedCache
from vllm_odb.engine.requests import RequestTable
from vllm_odb.engine.sampler import ODBSampler

MASK, EOS, VOCAB = 9, 8, 12


def params(stop=None, **extra):
    """A request's SamplingParams as the worker sees them."""
    return types.SimpleNamespace(temperature=0.0, max_tokens=None, extra_args=extra or None, stop=stop)


class Engine:
    """The sampler of one engine. ``refresh_logits(ids, pos)`` gives the refresh side forward's
    output rows (the stand-in model's hidden states are its logits); by default every position is
    confidently token ``(7 * id + position) % 8``. ``overlap``: the sampler reads a decode step's
    outcome at the next step (its default, engine/sampler.py), else in the step itself, where the
    rules of one step read most plainly."""

    def __init__(self, cfg, shift: int = 0, slots: int = 2, tokenizer=None, refresh_logits=None,
                 max_num_tokens: int = 4096, overlap: bool = False):
        self.table = RequestTable(slots, 512, cfg, shift, mask_id=MASK, eos_id=EOS, markers=[(EOS,)], device="cpu",
                                  tokenizer=tokenizer)
        self.width = self.table.width
        self.refresh_logits = refresh_logits or _confident_everywhere
        self.forwards: list[dict] = []  # each refresh side forward's inputs
        model = types.SimpleNamespace(model=types.SimpleNamespace(refresh_forward=self._refresh_forward),
                                      compute_logits=lambda h: h)
        blocks = torch.randperm(slots * 200, generator=torch.Generator().manual_seed(0)).view(slots, 200)
        self.paged = PagedCache(block_tables=blocks, kernel_block_size=4)
        base = types.SimpleNamespace(sampling_states=None, req_states=types.SimpleNamespace(
            draft_tokens=torch.zeros(slots, self.width, dtype=torch.long)))
        self.sampler = ODBSampler(self.table, CacheRefresh(model, self.paged), base, max_num_tokens)
        self.sampler.overlap = overlap and self.sampler.overlap

    def _refresh_forward(self, ids, pos, attend):
        self.forwards.append({"ids": ids.clone(), "pos": pos.clone(), "slots": attend.slots.clone(),
                              "bounds": list(attend.bounds)})
        return self.refresh_logits(ids, pos)

    def add(self, slot: int, req_id: str, prompt: list[int], prefill: list[int] | None = None, **kw):
        return self.table.add(slot, req_id, prompt, prefill, params(**kw))

    def prefill_done(self, slots: list[int]):
        """A step in which these requests' prompt prefill completes (no logits): the first block
        of each starts with a refresh."""
        n = len(slots)
        lens = np.array([self.table.get(s).start for s in slots])
        batch = types.SimpleNamespace(
            num_reqs=n, idx_mapping_np=np.array(slots), num_draft_tokens=0, cu_num_logits_np=np.zeros(n + 1, int),
            is_prefilling_np=np.ones(n, bool), num_scheduled_tokens=lens, num_computed_prefill_tokens_np=np.zeros(n),
            prefill_len_np=lens, num_tokens=int(lens.sum()), req_ids=[self.table.get(s).req_id for s in slots])
        return self.sampler(torch.zeros(n, VOCAB), batch)

    def decode(self, rows: dict[int, torch.Tensor]):
        """A decode step of the requests at these slots; ``rows[slot]``: the logits of its
        window's rows (fewer than the canvas width: the scheduler cut its window short)."""
        slots = list(rows)
        counts = np.array([len(rows[s]) for s in slots])
        batch = types.SimpleNamespace(
            num_reqs=len(slots), idx_mapping_np=np.array(slots), num_draft_tokens=int(counts.sum()),
            cu_num_logits_np=np.concatenate([[0], np.cumsum(counts)]), is_prefilling_np=np.zeros(len(slots), bool),
            num_scheduled_tokens=counts, num_computed_prefill_tokens_np=np.array([self.table.get(s).prompt_len
                                                                                 for s in slots]),
            prefill_len_np=np.array([self.table.get(s).prompt_len for s in slots]), num_tokens=int(counts.sum()),
            req_ids=[self.table.get(s).req_id for s in slots])
        return self.sampler(torch.cat([rows[s] for s in slots]), batch)

    def block(self, slot: int) -> torch.Tensor:
        q = self.table.get(slot)
        return self.table.tokens[slot, q.start:q.start + self.table.block]

    def draft_rows(self, slot: int) -> torch.Tensor:
        return self.sampler.req_states.draft_tokens[slot]


def _confident_everywhere(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    logits = torch.zeros(len(ids), VOCAB)
    logits[torch.arange(len(ids)), (ids * 7 + pos) % 8] = 5.0 + (pos % 3).float()
    return logits


def window(rows: int, confident: dict[int, tuple[int, float]] | None = None, base: float = 0.3) -> torch.Tensor:
    """Logits of ``rows`` window rows: row r's top-1 token ``confident[r][0]`` has probability
    ``confident[r][1]`` (the rest spread evenly over the other non-mask ids); other rows have
    token 3 at probability ``base``."""
    import math

    logits = torch.zeros(rows, VOCAB)
    for r in range(rows):
        token, c = (confident or {}).get(r, (3, base))
        rest = (1 - c) / (VOCAB - 2)  # the mask id is dropped before the softmax
        logits[r] = math.log(rest)
        logits[r, token] = math.log(c)
    return logits
