"""``VLLM_ODB_CHECK=1``: the engine's debugging checks (they sync the device every step).

Per request, a short history of what the runner scheduled and what the sampler did with it; and
per step, the invariants between vLLM's request state and ours, checked before the forward:

- the request in each batch row is the one our table holds at that row's slot;
- a row still prefilling starts at vLLM's host count of computed tokens (the GPU count, which the
  runner derives positions from, equals it: nothing of a prefill is ever rejected);
- a decode row starts where our table says its block starts (GPU count == block start), which is
  at or past the end of its prompt.

After our changes to positions and slots, every token id, position and KV slot of the step is
checked to be in range (``input_ranges``). A broken invariant raises, naming the request, with its
history: the step where vLLM's and our view of a request first part is then in the message, not a
device assert many steps later.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import numpy as np
import torch

_KEEP_EVENTS = 48  # per request
_KEEP_REQUESTS = 512


class History:
    def __init__(self):
        self.events: OrderedDict[str, deque] = OrderedDict()
        self.step = 0

    def log(self, req_id: str, event: str) -> None:
        d = self.events.get(req_id)
        if d is None:
            d = self.events[req_id] = deque(maxlen=_KEEP_EVENTS)
            if len(self.events) > _KEEP_REQUESTS:
                self.events.popitem(last=False)
        d.append(f"[step {self.step}] {event}")

    def of(self, req_id: str) -> str:
        return "\n  ".join(self.events.get(req_id, ["(no events)"]))


HISTORY = History()


def step_inputs(input_batch, table, history: History | None = None) -> None:
    """Check one step's rows (see the module doc) and log them; raises RuntimeError on the first
    broken invariant. ``input_batch``: vLLM's, after its positions were prepared, before ours."""
    history = history or HISTORY
    history.step += 1
    n = input_batch.num_reqs
    if n == 0:
        return
    qsl = input_batch.query_start_loc_np[:n]
    first = input_batch.positions[torch.as_tensor(qsl, dtype=torch.long, device=input_batch.positions.device)]
    gpu = first.cpu().numpy().astype(np.int64)  # the runner's GPU computed count of each row
    for r in range(n):
        rid = input_batch.req_ids[r]
        slot = int(input_batch.idx_mapping_np[r])
        q = table.get(slot)
        prefilling = bool(input_batch.is_prefilling_np[r])
        cpu = int(input_batch.num_computed_tokens_np[r])
        plen = int(input_batch.prefill_len_np[r])
        sched = int(input_batch.num_scheduled_tokens[r])
        ours = "none" if q is None else f"{q.req_id} start {q.start} end {q.end}{' finished' if q.finished else ''}"
        history.log(rid, f"row {r} slot {slot} {'prefill' if prefilling else 'decode'}: computed gpu {gpu[r]} "
                         f"cpu {cpu}, prefill {plen}, scheduled {sched}; table {ours}")
        problem = None
        if q is None or q.req_id != rid:
            problem = f"our table holds {ours} at slot {slot}"
        elif prefilling and gpu[r] != cpu:
            problem = f"prefill chunk starts at GPU position {gpu[r]}, vLLM's host count is {cpu}"
        elif not prefilling and gpu[r] != q.start and not q.finished:
            problem = f"decode window starts at GPU position {gpu[r]}, our block starts at {q.start}"
        elif not prefilling and gpu[r] < plen:
            problem = f"decode window starts at GPU position {gpu[r]}, inside its {plen}-token prefill"
        if problem:
            raise RuntimeError(f"vllm-odb check: request {rid} (batch row {r}): {problem}. Its history:\n  "
                               f"{history.of(rid)}")


def input_ranges(input_batch, slot_mappings: torch.Tensor, num_slots: int, vocab: int, max_model_len: int,
                 table) -> None:
    """The step's final inputs (after our positions and slots) are in range: token ids in the
    vocabulary, positions in the model length, KV slots in the cache. A bad index raises here,
    naming the request, instead of a device assert later."""
    n, t = input_batch.num_reqs, input_batch.num_tokens
    ids, pos = input_batch.input_ids[:t], input_batch.positions[:t]
    slots = slot_mappings[0, :t]
    bad = (ids < 0) | (ids >= vocab) | (pos < 0) | (pos >= max_model_len) | (slots >= num_slots)
    if bool(bad.any()):
        tok = int(torch.nonzero(bad)[0, 0])
        row = int(np.searchsorted(input_batch.query_start_loc_np[1:n + 1], tok, side="right"))
        req = table.get(int(input_batch.idx_mapping_np[row]))
        raise RuntimeError(
            f"vllm-odb check: token {tok} (batch row {row}, {req}) has id {int(ids[tok])}, position "
            f"{int(pos[tok])}, slot {int(slots[tok])}; scheduled {input_batch.num_scheduled_tokens[:n].tolist()}, "
            f"prefilling {input_batch.is_prefilling_np[:n].tolist()}")


def sampled(input_batch, nlog: np.ndarray, actions: dict[int, str], num_sampled: torch.Tensor,
            num_rejected: torch.Tensor, history: History | None = None) -> None:
    """Log what the sampler returned for each row of the step."""
    history = history or HISTORY
    n = input_batch.num_reqs
    ns, nr = num_sampled.tolist(), num_rejected.tolist()
    for r in range(n):
        history.log(input_batch.req_ids[r], f"sampler row {r}: {actions.get(r, 'nothing')}, logits {int(nlog[r])}, "
                                            f"sampled {ns[r]}, rejected {nr[r]}")


def probe_runner(runner, history: History | None = None) -> None:
    """Log every change the V2 runner makes to its GPU count of computed tokens (the count it
    derives positions from): at request admission and update (``add_requests``,
    ``update_requests``) and after sampling (``postprocess_sampled``), per request, with the query
    length and rejections behind it. Wraps the runner instance's methods; VLLM_ODB_CHECK only."""
    history = history or HISTORY
    counts = runner.req_states.num_computed_tokens
    names = runner.req_states.index_to_req_id

    def snap() -> np.ndarray:
        return counts.gpu.cpu().numpy().astype(np.int64)

    def report(where: str, before: np.ndarray, after: np.ndarray, detail: dict[int, str]) -> None:
        for i in sorted(set(np.flatnonzero(before != after).tolist()) | set(detail)):
            rid = names.get(i, f"(free slot {i})")
            history.log(rid, f"{where}: GPU computed of slot {i} {before[i]} -> {after[i]}{detail.get(i, '')}")

    def wrap_update(name: str):
        original = getattr(runner, name)

        def wrapped(scheduler_output, *args, **kwargs):
            before = snap()
            out = original(scheduler_output, *args, **kwargs)
            report(name, before, snap(), {})
            return out

        setattr(runner, name, wrapped)

    for name in ("add_requests", "update_requests"):
        wrap_update(name)
    original_post = runner.postprocess_sampled

    def postprocess_sampled(idx_mapping, sampled_tokens, num_sampled, num_rejected, query_start_loc=None,
                            *args, **kwargs):
        before = snap()
        out = original_post(idx_mapping, sampled_tokens, num_sampled, num_rejected, query_start_loc, *args, **kwargs)
        idx = idx_mapping.tolist()
        rejected = num_rejected.tolist()
        qsl = query_start_loc.tolist() if query_start_loc is not None else None
        detail = {i: f" (query {qsl[b + 1] - qsl[b] if qsl else '?'}, rejected {rejected[b]})"
                  for b, i in enumerate(idx) if i >= 0}
        report("postprocess_sampled", before, snap(), detail)
        return out

    runner.postprocess_sampled = postprocess_sampled
