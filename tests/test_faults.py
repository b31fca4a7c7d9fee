"""One request's failure ends that request, not the engine (engine/sampler.py, engine/faults.py,
patches/request_errors.py), on CPU:

- non-finite logits (a decode step's, or a refresh's) fail their request: it emits nothing more,
  its slots are rejected, and ``SamplerOutput.num_nans`` marks its row every step until it leaves;
- debug fault injection (``VLLM_ODB_DEBUG_FAULTS``) is refused when off and changes nothing when
  no request asks for a fault;
- a batch where requests fault (NaN logits, a raise in their own step, at a refresh or a decode
  step) through the engine emulator: every other request decodes exactly the reference loop's
  tokens, the faulted ones end with an error having emitted only a prefix of their reference;
- vLLM's real scheduler ends a reported request with ``FINISHED_ERROR`` (KV freed) and keeps the
  others.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from engine_stubs import VOCAB, Engine, window  # noqa: E402

from vllm_odb.engine import faults  # noqa: E402
from vllm_odb.engine.knobs import engine_config, request_config  # noqa: E402
from vllm_odb.policies import DecodeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = DecodeConfig(gen_length=32, block_length=8)


@pytest.fixture
def debug_faults(monkeypatch):
    monkeypatch.setenv(faults.ENV, "1")


# ---- the knob -----------------------------------------------------------------------------------
def test_debug_fault_is_refused_unless_enabled(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    with pytest.raises(ValueError, match="debug_fault: debug fault injection is off"):
        request_config(CFG, {"debug_fault": "nan"})
    assert faults.request_fault({"threshold": 0.5}) is None


@pytest.mark.parametrize("value,fault", [("nan", faults.Fault("nan", 1)), ("raise@3", faults.Fault("raise", 3)),
                                         ("crash@12", faults.Fault("crash", 12))])
def test_debug_fault_values(debug_faults, value, fault):
    assert faults.request_fault({"debug_fault": value}) == fault
    assert request_config(CFG, {"debug_fault": value, "threshold": 0.5}) == request_config(CFG, {"threshold": 0.5})


@pytest.mark.parametrize("value", ["boom", "nan@0", "nan@-1", "nan@x", "nan@", "raise@1e3", 3, ["nan"], "nan@٣"])
def test_malformed_debug_faults_name_the_key(debug_faults, value):
    with pytest.raises(ValueError, match="debug_fault"):
        request_config(CFG, {"debug_fault": value})


def test_faults_fire_at_their_forward():
    assert [faults.Fault("nan", 3).due(n) for n in range(5)] == [False, False, True, True, True]
    assert [faults.Fault("raise", 3).due(n) for n in range(5)] == [False, False, True, False, False]


def test_no_fault_no_faulty_slot(debug_faults):
    engine = Engine(CFG)
    engine.add(0, "a", [1, 2, 3, 4])
    assert not engine.table.faulty
    engine.add(1, "b", [1, 2, 3], debug_fault="nan@2")
    assert engine.table.faulty == {1}
    engine.table.remove("b")
    assert not engine.table.faulty


# ---- non-finite logits ----------------------------------------------------------------------------
def test_nan_logits_fail_their_request_only():
    """Request b's window has a NaN row: b fails (nothing emitted, every slot rejected, its row
    reported) while a decides its block as it would alone."""
    engine = Engine(CFG)
    alone = Engine(CFG)
    for e in (engine, alone):
        e.add(0, "a", [1, 2, 3, 4])
    engine.add(1, "b", [1, 2, 3])
    conf = {r: (3, 0.99) for r in range(8)}
    bad = window(8, conf)
    bad[5, 2] = float("nan")
    out = engine.decode({0: window(8, conf), 1: bad})
    ref = alone.decode({0: window(8, conf)})
    assert out.num_sampled.tolist() == [8, 0] and out.num_rejected.tolist() == [0, 8]
    assert torch.equal(out.sampled_token_ids[0], ref.sampled_token_ids[0])
    assert out.num_nans.tolist() == [0, 1]
    b = engine.table.get(1)
    assert b.error and b.finished and engine.table.failed == {1}
    # the next step (scheduled before vLLM read this one): b decides nothing and is reported again
    out = engine.decode({0: window(8, conf), 1: window(8, conf)})
    assert int(out.num_sampled[1]) == 0 and int(out.num_rejected[1]) == 8 and out.num_nans.tolist() == [0, 1]
    engine.table.remove("b")
    assert not engine.table.failed
    out = engine.decode({0: window(8, conf)})
    assert out.num_nans is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_refresh_with_non_finite_logits_fails_at_the_next_step(bad):
    """The refresh adds no host sync: its non-finite confidence is read with the next decode
    step's flags, before anything of the request goes out."""
    def refresh_logits(ids, pos):
        out = torch.zeros(len(ids), VOCAB)
        out[:, 3] = 5.0
        out[len(ids) // 2:, 4] = bad  # b's sequence is the second job
        return out

    engine = Engine(CFG, refresh_logits=refresh_logits)
    engine.add(0, "a", [1, 2, 3, 4])
    engine.add(1, "b", [1, 2, 3, 4])
    out = engine.prefill_done([0, 1])
    assert out.num_nans is None  # not known yet
    conf = {r: (3, 0.99) for r in range(8)}
    out = engine.decode({0: window(8, conf), 1: window(8, conf)})
    assert out.num_sampled.tolist() == [8, 0] and out.num_nans.tolist() == [0, 1]
    assert engine.table.get(1).error.startswith("non-finite logits")


def test_finite_logits_never_report():
    engine = Engine(CFG)
    engine.add(0, "a", [1, 2, 3, 4])
    assert engine.decode({0: window(8)}).num_nans is None
    assert not engine.table.failed


# ---- the emulated engine: a batch where requests fault ------------------------------------------
GEN, BLOCK = 64, 16


def _ckpt(fmt: str):
    from engine_emulator import tiny_checkpoint

    return tiny_checkpoint(fmt)


def _batch(fmt: str, fault_of: dict[int, str], n: int = 5, section: dict | None = None):
    """``n`` suite prompts at once through the emulated engine (odb-alp, threshold 1.0 so blocks
    take several decode steps), request i carrying ``fault_of.get(i)``; and each prompt alone
    through the reference loop."""
    from engine_emulator import EmulatedEngine

    from vllm_odb.reference.generate import generate, response_ids
    from vllm_odb.tiny.suite import make_suite

    ck = _ckpt(fmt)
    engine_cfg = engine_config({"odb": {"block_length": BLOCK, "gen_length": GEN,
                                        **(section or {"method": "odb-alp", "threshold": 1.0})}})
    engine = EmulatedEngine(ck, engine_cfg, slots=n)
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(47, n)]
    sps = [types.SimpleNamespace(temperature=0.0, max_tokens=GEN, stop=None,
                                 extra_args={"debug_fault": fault_of[i]} if i in fault_of else None)
           for i in range(n)]
    got = engine.generate(prompts, sps)
    refs = [response_ids(generate(ck.model, [p], engine_cfg.replace(gen_length=GEN), ck.special).tokens[0],
                         ck.special) for p in prompts]
    return engine, got, refs


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_faulted_requests_end_with_an_error_and_the_others_decode_as_alone(fmt, debug_faults):
    """nan@1 (the first refresh), nan@3 and raise@2 (decode steps), raise@1 (the first refresh's
    own checks): those four end with an error; the fifth decodes the reference's tokens exactly.
    A faulted request emitted nothing after its fault: what it emitted is a prefix of its
    reference response, and nothing came out in the step scheduled before vLLM ended it."""
    fault_of = {0: "nan@3", 1: "raise@1", 3: "raise@2", 4: "nan@1"}
    engine, got, refs = _batch(fmt, fault_of)
    assert engine.errors == set(fault_of)
    assert got[2] == refs[2]
    assert all(got[i] is None for i in fault_of)
    assert engine.emitted_after_error == 0
    for i in fault_of:  # nothing failed silently into the response
        emitted = engine.emitted_tokens[i]
        assert emitted == refs[i][:len(emitted)]
    assert not engine.table.failed and not engine.table.faulty  # all left the table


@pytest.mark.parametrize("fault", ["nan@1", "nan@3", "raise@3", "nan@4"])
def test_faults_on_a_jump_share_engine(debug_faults, monkeypatch, fault):
    """The same on the jump-share engine (odb; two requests, so the draft budget leaves room for
    drafts): a fault in a step that decides from branches (or in the refresh that plans the first
    ones) ends that request with an error having emitted a prefix of its reference; the other
    completes. (Its tokens are not compared: drafts depend on the requests sharing the step.)"""
    from vllm_odb.engine.sampler import ODBSampler

    branched = []
    branch_group = ODBSampler._branch_group

    def spy(self, logits, firsts, slots, reqs, masked, step, members):
        branched.extend((reqs[i].req_id, reqs[i].forwards_taken + 1) for i in members)
        return branch_group(self, logits, firsts, slots, reqs, masked, step, members)

    monkeypatch.setattr(ODBSampler, "_branch_group", spy)
    engine, got, refs = _batch("llada", {0: fault}, n=2, section={"method": "odb", "threshold": 1.0, "ridge_rows": 64})
    assert engine.errors == {0} and got[1] is not None and engine.emitted_after_error == 0
    assert engine.emitted_tokens[0] == refs[0][:len(engine.emitted_tokens[0])]
    at = int(fault.split("@")[1])
    assert at == 1 or ("r0", at) in branched  # the faulted forward decided from branches


@pytest.mark.parametrize("fmt", ["llada"])
def test_debug_faults_on_without_a_faulted_request_change_nothing(fmt, debug_faults):
    engine, got, refs = _batch(fmt, {}, n=3)
    assert got == refs and not engine.errors


# ---- vLLM's scheduler -----------------------------------------------------------------------------
def test_the_scheduler_ends_a_reported_request_with_an_error(monkeypatch):
    """A real vLLM Scheduler (CPU) with the patch: the request reported in ``num_nans_in_logits``
    is finished with FINISHED_ERROR, its client output says so, its KV blocks go back; the other
    request runs on. A second report of it (the step in flight) is ignored."""
    import vllm.plugins
    from vllm import SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import FinishReason
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request, RequestStatus
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm_plugin_common import _cpu_shims, _create

    from vllm_odb.engine import kv_release

    _cpu_shims(monkeypatch)
    # the scheduler patch tells kv_release a scheduler listens in this process: undone after the test
    monkeypatch.setattr(kv_release, "_listening", kv_release._listening)
    vllm.plugins.load_general_plugins()
    config = _create("llada")
    config.cache_config.num_gpu_blocks = 64
    spec = FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    sched = Scheduler(config, kv, StructuredOutputManager(config), block_size=16)
    free0 = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    for rid in "ab":
        sched.add_request(Request(rid, list(range(20)), SamplingParams(max_tokens=32, temperature=0.0), None))
    step = sched.schedule()
    held = free0 - sched.kv_cache_manager.block_pool.get_num_free_blocks()

    def output(nans):
        return ModelRunnerOutput(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1}, sampled_token_ids=[[], []],
                                 num_nans_in_logits=nans)

    outs = sched.update_from_output(step, output({"a": 0, "b": 1}))
    finished = {o.request_id: o.finish_reason for o in outs[0].outputs if o.finish_reason is not None}
    assert finished == {"b": FinishReason.ERROR}
    assert sched.requests["a"].status == RequestStatus.RUNNING and "b" not in sched.requests
    assert free0 - sched.kv_cache_manager.block_pool.get_num_free_blocks() == held // 2
    outs = sched.update_from_output(step, output({"a": 0, "b": 1}))  # the step that was in flight
    assert not [o for o in outs.get(0, types.SimpleNamespace(outputs=[])).outputs if o.finish_reason is not None]
    assert sched.requests["a"].status == RequestStatus.RUNNING
