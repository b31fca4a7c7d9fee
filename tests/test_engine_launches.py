"""A plain decode step of the engine launches few device ops.

Between the graphed forwards the GPU waits while the host launches the sampler's ops one at a time:
about 3 ms of a 10.6 ms batch-1 step on the H100 (BENCHMARKS.md, "Per-step profile"). So the
number of ops a decode step issues is a budget. This test counts them on the CPU with the real
sampler and request table (tests/engine_emulator.py). Each op the sampler dispatches, views aside,
is one kernel launch on a GPU (or one copy).
"""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode
from vllm import SamplingParams

from engine_emulator import EmulatedEngine, tiny_checkpoint
from shipped import make_suite
from vllm_odb.engine.knobs import engine_config

# Ops that launch nothing: views, metadata, allocation without a fill.
_FREE = {"view", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided", "reshape", "_reshape_alias",
         "t", "transpose", "permute", "detach", "detach_", "alias", "lift_fresh", "empty", "empty_strided",
         "_unsafe_view", "split", "unbind", "narrow", "_local_scalar_dense"}
# The plain decode step's launches at batch 1 and 2, after the cuts that brought it from 72 to 43
# (marker checks, output buffers, the single-group path, the finiteness check). Raise only with a reason.
BUDGET = 43
EMIT = 6
# A step that must complete every block it decodes is read in the step (engine/sampler.py, overlap's
# exception): it decodes and sends the block out at once, in place of the next step's idle forward
# and all of that step's launches; the read and the block's emit add to its own.
SETTLE_NOW = 2


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in _FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _plain_step_ops(method: str, requests: int, max_tokens: tuple[int, ...] = (64, 64), **knobs) -> list[int]:
    """Ops of each decode step that runs no refresh (no model op inside it); request i asks for
    ``max_tokens[i]`` tokens; ``knobs``: more engine knobs."""
    ckpt = tiny_checkpoint("llada")
    eng = EmulatedEngine(ckpt, engine_config({"odb": {"method": method, "block_length": 16, "threshold": 1.0,
                                                      **knobs}}), slots=requests)
    inner, counts = eng.sampler, []

    def counted(logits, batch):
        with _Count() as c:
            out = inner(logits, batch)
        if batch.num_draft_tokens and not {"mm", "addmm", "bmm", "linear"} & set(c.ops):
            counts.append(len(c.ops))
        return out

    eng.sampler = counted
    prompts = [ckpt.encode_chat(e.prompt) for e in make_suite(31, requests)]
    eng.generate(prompts, [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens[:requests]])
    return counts


@pytest.mark.parametrize("method", ["fast-dllm", "odb-alp"])
@pytest.mark.parametrize("requests", [1, 2])
def test_a_plain_decode_step_stays_within_its_launch_budget(method, requests):
    """The same budget at batch 1 and 2: a step's launches do not grow with the batch."""
    counts = _plain_step_ops(method, requests)
    assert counts, "no plain decode step ran: the test decodes nothing it can count"
    typical = sorted(counts)[len(counts) // 2]
    assert typical <= BUDGET, f"a plain decode step issues {typical} device ops (budget {BUDGET}): {counts}"
    # a step that sends a block out (the request's last, with no refresh after it) writes the output
    # too, and in the same step as its decisions when that step had to complete it
    most = BUDGET + EMIT + SETTLE_NOW
    assert max(counts) <= most, f"a decode step issues {max(counts)} device ops (budget {most}): {counts}"


def test_requests_of_different_lengths_decide_together():
    """Requests differing only in max_tokens (so in their canvas length) share one decision: a
    step's launches stay within the budget, as for requests alike."""
    counts = _plain_step_ops("fast-dllm", 2, max_tokens=(64, 48))
    assert counts and sorted(counts)[len(counts) // 2] <= BUDGET, counts


# Jump-share's step (odb: the plans' branches decided and the next plans laid out): the accept
# rule settling the states of one size at once, and the draft family made once, took its typical
# step from 236 to 192 ops at batch 1 and from 405 to 343 at batch 2; deciding and planning the
# batch's requests together (one branch_step and one plan_branches per knob set) took batch 2 to 204.
# Plans laid out on the device at the step width (no host read: the largest family the budget
# allows, drafts past a request's own count invalid) took more accept levels; the accept rule's
# reachability by boolean squaring of the step matrix (log2 of the levels) took it to 173 and 185.
JUMP_BUDGET = {1: 175, 2: 187}


@pytest.mark.parametrize("requests", [1, 2])
def test_a_jump_share_decode_step_stays_within_its_launch_budget(requests):
    counts = _plain_step_ops("odb", requests)
    assert counts, "no jump-share decode step ran"
    typical = sorted(counts)[len(counts) // 2]
    assert typical <= JUMP_BUDGET[requests], f"{typical} device ops (budget {JUMP_BUDGET[requests]}): {counts}"


def test_a_jump_share_step_with_no_room_for_drafts_costs_a_plain_one():
    """When the batch's share of the draft budget is the window (knobs.step_width), jump-share
    plans nothing: its step is the plain engine's (odb-alp), not a planning step that finds no room
    (ridge_rows 32, block 16: two requests get 16 rows each)."""
    jump, plain = _plain_step_ops("odb", 2, ridge_rows=32), _plain_step_ops("odb-alp", 2)
    assert jump and plain and sorted(jump)[len(jump) // 2] <= sorted(plain)[len(plain) // 2], (jump, plain)


def test_a_jump_share_decode_step_reads_nothing_back(monkeypatch):
    """The host never waits for a jump-share step's forward: deciding the branches, planning the
    next step's (on the device, in the rows the next step gives) and writing its rows read nothing
    back. The one read is the last step's outcome (``Outcome.read``), which on the GPU waits for
    that step's decisions only: the step overlaps, as a plain one does. Except a step that must
    complete every block it decodes: it reads its own outcome (one read), so its refresh runs at
    once instead of after an idle forward."""
    import torch

    from vllm_odb.engine import sampler as sampler_mod

    reading, certain = [], []
    real_read, real_tolist = sampler_mod.Outcome.read, torch.Tensor.tolist
    real_certain = sampler_mod.ODBSampler._completes_every_block

    def completes(reqs, drafted=frozenset()):
        certain[-1] = real_certain(reqs, drafted)
        return certain[-1]

    monkeypatch.setattr(sampler_mod.ODBSampler, "_completes_every_block", staticmethod(completes))

    def read(self):
        reading.append(True)
        try:
            return real_read(self)
        finally:
            reading.pop()

    reads: list[int] = []

    class _Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.startswith("_local_scalar_dense") and not reading:
                reads[-1] += 1
            return func(*args, **(kwargs or {}))

    def tolist(t):
        if not reading:
            reads[-1] += 1
        return real_tolist(t)

    monkeypatch.setattr(sampler_mod.Outcome, "read", read)
    ckpt = tiny_checkpoint("llada")
    eng = EmulatedEngine(ckpt, engine_config({"odb": {"method": "odb", "block_length": 16, "threshold": 1.0}}),
                         slots=2)
    inner, steps = eng.sampler, []

    def counted(logits, batch):
        reads.append(0)
        certain.append(False)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        try:
            with _Count() as c, _Reads():
                out = inner(logits, batch)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
        if batch.num_draft_tokens and not {"mm", "addmm", "bmm", "linear"} & set(c.ops):
            steps.append((reads[-1] - certain[-1], any(q is not None and q.plan is not None and int(q.plan.drafts) > 0
                                                       for q in eng.table.reqs)))
        return out

    eng.sampler = counted
    prompts = [ckpt.encode_chat(p) for p in ("Reverse: abcde", "Add 12 and 30")]
    eng.generate(prompts, [SamplingParams(max_tokens=64, temperature=0.0)] * 2)
    assert any(drafted for _, drafted in steps), "no step planned drafts: nothing was tested"
    assert [n for n, _ in steps] == [0] * len(steps), steps
