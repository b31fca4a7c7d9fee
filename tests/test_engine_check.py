"""``VLLM_ODB_CHECK=1``'s step checks (vllm_odb/engine/check.py) on CPU: each invariant between
vLLM's request state and our table raises, naming the request and carrying its history."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm_odb.engine import check  # noqa: E402
from vllm_odb.engine.requests import RequestTable  # noqa: E402
from vllm_odb.policies import DecodeConfig  # noqa: E402

MASK, EOS = 9, 8


def _table():
    table = RequestTable(4, 256, DecodeConfig(gen_length=32, block_length=8), 1, mask_id=MASK, eos_id=EOS,
                         markers=[(EOS,)], device="cpu")
    params = types.SimpleNamespace(temperature=0.0, max_tokens=None, extra_args=None)
    table.add(0, "a", list(range(10)), None, params)  # decoding: block start 10
    table.add(2, "b", list(range(6)), None, params)  # prefilling
    return table


def _batch(gpu_first: list[int], prefilling=(False, True), computed=(10, 4), req_ids=("a", "b"), slots=(0, 2)):
    """Two rows: ``a`` decodes a 9-slot window, ``b`` prefills 2 of its 6 prompt tokens. The
    positions are what vLLM derives from its GPU computed counts (``gpu_first``)."""
    sched = np.array([9, 2])
    qsl = np.array([0, 9, 11])
    pos = torch.cat([torch.arange(s, s + k) for s, k in zip(gpu_first, sched)])
    return types.SimpleNamespace(num_reqs=2, query_start_loc_np=qsl, positions=pos, req_ids=list(req_ids),
                                 idx_mapping_np=np.array(slots), is_prefilling_np=np.array(prefilling),
                                 num_computed_tokens_np=np.array(computed), prefill_len_np=np.array([10, 6]),
                                 num_scheduled_tokens=sched)


def test_consistent_step_passes_and_is_logged():
    history = check.History()
    check.step_inputs(_batch([10, 4]), _table(), history)
    assert "row 0 slot 0 decode: computed gpu 10 cpu 10" in history.of("a")
    assert "row 1 slot 2 prefill: computed gpu 4 cpu 4" in history.of("b")


@pytest.mark.parametrize("batch, message", [
    (_batch([0, 4]), "request a .*decode window starts at GPU position 0, our block starts at 10"),
    (_batch([10, 0]), "request b .*prefill chunk starts at GPU position 0, vLLM's host count is 4"),
    (_batch([10, 4], slots=(2, 0)), "request a .*our table holds b"),
    (_batch([10, 4], slots=(1, 2)), "request a .*our table holds none"),
])
def test_broken_invariant_raises_with_the_history(batch, message):
    history = check.History()
    history.log("a", "earlier event")
    with pytest.raises(RuntimeError, match=message) as e:
        check.step_inputs(batch, _table(), history)
    assert "vllm-odb check" in str(e.value)
    if "request a" in message:
        assert "earlier event" in str(e.value)


def test_history_is_bounded():
    history = check.History()
    for i in range(check._KEEP_REQUESTS + 5):
        for j in range(check._KEEP_EVENTS + 3):
            history.log(f"r{i}", f"e{j}")
    assert len(history.events) == check._KEEP_REQUESTS and "r0" not in history.events
    assert len(history.events["r6"]) == check._KEEP_EVENTS


def test_sampler_actions_are_logged():
    history = check.History()
    batch = types.SimpleNamespace(num_reqs=2, req_ids=["a", "b"])
    check.sampled(batch, np.array([9, 0]), {0: "decode", 1: "prefill chunk + refresh"},
                  torch.tensor([8, 0]), torch.tensor([1, 0]), history)
    assert "decode, logits 9, sampled 8, rejected 1" in history.of("a")
    assert "prefill chunk + refresh" in history.of("b")


def test_sampler_logs_each_rows_action_under_check(monkeypatch):
    """With the checks on, the sampler records what it did with each row (here: a full decode
    window and one the scheduler cut short)."""
    from vllm_odb.engine import sampler as sampler_mod
    from vllm_odb.engine.model_state import CacheRefresh, PagedCache
    from vllm_odb.engine.sampler import ODBSampler

    monkeypatch.setattr(sampler_mod, "CHECK", True)
    history = check.History()
    monkeypatch.setattr(check, "HISTORY", history)
    table = RequestTable(2, 512, DecodeConfig(gen_length=32, block_length=8), 0, mask_id=MASK, eos_id=EOS,
                         markers=[(EOS,)], device="cpu")
    params = types.SimpleNamespace(temperature=0.0, max_tokens=None, extra_args=None)
    table.add(0, "a", [1, 2, 3, 4], None, params)
    table.add(1, "b", [1, 2, 3], None, params)
    base = types.SimpleNamespace(sampling_states=None, req_states=types.SimpleNamespace(
        draft_tokens=torch.zeros(2, table.width, dtype=torch.long)))
    batch = types.SimpleNamespace(
        num_reqs=2, req_ids=["a", "b"], idx_mapping_np=np.array([0, 1]), num_draft_tokens=13,
        cu_num_logits_np=np.array([0, 8, 13]), is_prefilling_np=np.array([False, False]),
        num_scheduled_tokens=np.array([8, 5]), num_computed_prefill_tokens_np=np.array([4, 3]),
        prefill_len_np=np.array([4, 3]))
    ODBSampler(table, CacheRefresh(None, PagedCache()), base, 4096)(torch.zeros(13, 12), batch)
    assert "sampler row 0: decode, logits 8, sampled 0, rejected 8" in history.of("a")
    assert "sampler row 1: short window, logits 5, sampled 0, rejected 5" in history.of("b")


def test_runner_probe_logs_each_change_of_the_gpu_counts():
    """The probe wraps the runner's state updates and logs, per request, how its GPU computed
    count moved: at admission, and after sampling with the query length and rejections."""
    counts = types.SimpleNamespace(gpu=torch.zeros(4, dtype=torch.int32))
    names = {1: "a", 3: "b"}

    class Runner:
        req_states = types.SimpleNamespace(num_computed_tokens=counts, index_to_req_id=names)

        def add_requests(self, scheduler_output):
            counts.gpu[3] = 5  # b admitted with 5 computed

        def update_requests(self, scheduler_output):
            pass

        def postprocess_sampled(self, idx_mapping, sampled, num_sampled, num_rejected, query_start_loc=None):
            q = query_start_loc[1:] - query_start_loc[:-1]
            counts.gpu[idx_mapping.long()] += (q - num_rejected).to(torch.int32)

    runner, history = Runner(), check.History()
    check.probe_runner(runner, history)
    runner.add_requests(None)
    runner.update_requests(None)
    runner.postprocess_sampled(torch.tensor([1, 3]), None, torch.tensor([0, 8]), torch.tensor([9, 1]),
                               torch.tensor([0, 9, 18]))
    assert "add_requests: GPU computed of slot 3 0 -> 5" in history.of("b")
    assert "postprocess_sampled: GPU computed of slot 3 5 -> 13 (query 9, rejected 1)" in history.of("b")
    assert "postprocess_sampled: GPU computed of slot 1 0 -> 0 (query 9, rejected 9)" in history.of("a")
    assert "update_requests" not in history.of("a") + history.of("b")


def test_a_failing_sampler_step_is_logged_before_it_raises(monkeypatch, caplog):
    """Under async scheduling vLLM reports the next step's failure, not the sampler's: the
    sampler's own exception must reach the log (and, with the checks on, each row's history)."""
    from vllm_odb.engine import sampler as sampler_mod
    from vllm_odb.engine.model_state import CacheRefresh, PagedCache
    from vllm_odb.engine.sampler import ODBSampler

    monkeypatch.setattr(sampler_mod, "CHECK", True)
    history = check.History()
    monkeypatch.setattr(check, "HISTORY", history)
    table = RequestTable(1, 512, DecodeConfig(gen_length=32, block_length=8), 0, mask_id=MASK, eos_id=EOS,
                         markers=[(EOS,)], device="cpu")
    table.add(0, "a", [1, 2, 3], None, types.SimpleNamespace(temperature=0.0, max_tokens=None, extra_args=None))
    refresh = CacheRefresh(types.SimpleNamespace(), PagedCache(torch.zeros(1, 64, dtype=torch.long), 4))
    base = types.SimpleNamespace(sampling_states=None, req_states=None)
    batch = types.SimpleNamespace(  # a prompt whose prefill completes: the refresh runs, and fails
        num_reqs=1, req_ids=["a"], idx_mapping_np=np.array([0]), num_draft_tokens=0,
        cu_num_logits_np=np.array([0, 1]), is_prefilling_np=np.array([True]), num_scheduled_tokens=np.array([3]),
        num_computed_prefill_tokens_np=np.array([0]), prefill_len_np=np.array([3]))
    with pytest.raises(AttributeError):  # the stand-in model has no layers to refresh with
        ODBSampler(table, refresh, base, 4096)(torch.zeros(1, 12), batch)
    assert "vllm-odb: the sampler failed on a step of 1 requests" in caplog.text
    assert "sampler raised AttributeError" in history.of("a")


def test_input_ranges_name_the_request_of_a_bad_index():
    """The step's final ids, positions and KV slots must be in range; the first bad one raises,
    naming its batch row and request."""
    table = _table()
    batch = _batch([10, 4])
    batch.num_tokens = 11
    batch.input_ids = torch.full((11,), 3)
    slots = torch.arange(11)[None]
    check.input_ranges(batch, slots, num_slots=64, vocab=12, max_model_len=256, table=table)  # in range
    bad = slots.clone()
    bad[0, 10] = 64  # b's second token: a slot past the cache
    with pytest.raises(RuntimeError, match=r"token 10 \(batch row 1, .*b.*\) has id 3, position 5, slot 64"):
        check.input_ranges(batch, bad, num_slots=64, vocab=12, max_model_len=256, table=table)
    batch.input_ids[2] = 12  # a's third token: an id past the vocabulary
    with pytest.raises(RuntimeError, match=r"token 2 \(batch row 0, .*a.*\) has id 12"):
        check.input_ranges(batch, slots, num_slots=64, vocab=12, max_model_len=256, table=table)
