"""The engine's decode loop against the reference loop on CPU (tests/engine_emulator.py: the
engine's table, sampler and refresh driven as vLLM drives them, the reference model standing in
for vLLM's forward): every request's response and NFE equal the reference's, on both tiny
checkpoints, for each engine method; the GPU runs (``bench vllm-parity``) check the same with
vLLM's own forward."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from engine_emulator import EmulatedEngine, tiny_checkpoint  # noqa: E402
from vllm_odb.engine.knobs import engine_config  # noqa: E402
from vllm_odb.reference.generate import generate, response_ids  # noqa: E402
from shipped import STOP_STRINGS, WORKED, make_suite  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GEN, BLOCK = 64, 16
_ckpt = tiny_checkpoint


def _parity(fmt: str, section: dict, n: int = 3, stop: list[str] | None = None) -> dict:
    """Each of ``n`` suite prompts alone through the emulated engine and the reference loop."""
    torch.manual_seed(0)
    ck = _ckpt(fmt)
    engine_cfg = engine_config({"odb": {"block_length": BLOCK, "gen_length": GEN, **section}})
    engine = EmulatedEngine(ck, engine_cfg)
    cfg = engine_cfg.replace(gen_length=GEN)
    stop_ids = [ck.tokenizer(s, add_special_tokens=False)["input_ids"] for s in stop or []]
    got = {"tokens": 0, "nfe": [], "ref_nfe": [], "drafts": 0, "canvas": []}
    for e in make_suite(41, n):
        prompt = ck.encode_chat(e.prompt)
        sp = types.SimpleNamespace(temperature=0.0, max_tokens=GEN, extra_args=None, stop=stop)
        (out,) = engine.generate([prompt], sp)
        ref = generate(ck.model, [prompt], cfg, ck.special, stop=stop_ids)
        ref_stop = generate(ck.model, [prompt], cfg.replace(early_stop=True), ck.special, stop=stop_ids)
        assert out == response_ids(ref.tokens[0], ck.special), e.prompt
        got["nfe"].append(engine.stats["forwards"])
        got["ref_nfe"].append(ref_stop.nfe[0])
        assert engine.stats["canvas_predicted"] == ref_stop.stats["canvas_length"][0]
        got["canvas"].append(engine.stats["canvas_predicted"])
        got["drafts"] += engine.stats["drafts_accepted"]
        assert engine.stats["drafts_accepted"] == ref_stop.stats["drafted_accepted"][0]
        got["tokens"] += len(out)
    assert got["nfe"] == got["ref_nfe"]
    return got


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("section", [{"method": "fast-dllm"}, {"method": "odb-alp"}, {"method": "dynamic-apd"},
                                     {"method": "odb-alp", "threshold_alpha": 0.3},
                                     {"method": "fast-dllm", "suffix_window": 16, "threshold_alpha": 0.3}],
                         ids=["fast-dllm", "odb-alp", "dynamic-apd", "dynamic-threshold", "suffix-pruning"])
def test_engine_decodes_as_the_reference(fmt, section):
    """Threshold 1.0 (the tiny models decode most blocks in their refresh at 0.9): blocks take
    several decode steps, so the step, its thresholds and the refreshes all run."""
    got = _parity(fmt, {**section, "threshold": 1.0})
    assert got["tokens"] > 0 and sum(got["nfe"]) > 3  # more than one forward a request


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_jump_share_engine_decodes_as_the_reference(fmt):
    got = _parity(fmt, {"method": "odb", "threshold": 1.0, "ridge_rows": 64})
    assert got["drafts"] > 0


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_stop_strings_are_end_markers_on_both_engines(fmt):
    """A request's stop strings, tokenized by the engine (engine/requests.py ``StopMarkers``), are
    end markers there as in the reference loop: ALP cuts the canvas at one and early termination
    stops at one (shipped.STOP_STRINGS: one of a token, one of two)."""
    plain = _parity(fmt, {"method": "odb-alp"})
    stopped = _parity(fmt, {"method": "odb-alp"}, stop=STOP_STRINGS)
    assert stopped["canvas"][0] < plain["canvas"][0]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
def test_requests_decode_alike_alone_and_in_a_batch(fmt, overlap, monkeypatch):
    """Three requests at once, their refreshes cut into chunks of a small token budget: each
    response is the reference loop's for that prompt alone, and the NFE the engine counted is the
    sum of theirs (ALP and early stop on; plain engine: no shared draft budget). With overlap (the
    default) and without (VLLM_ODB_OVERLAP=0: each step's outcome read in the step)."""
    monkeypatch.setenv("VLLM_ODB_OVERLAP", "1" if overlap else "0")
    ck = _ckpt(fmt)
    engine_cfg = engine_config({"odb": {"block_length": BLOCK, "gen_length": GEN, "method": "odb-alp",
                                        "threshold": 1.0}})
    engine = EmulatedEngine(ck, engine_cfg, slots=3)
    assert engine.sampler.overlap == overlap
    engine.sampler.refresh_budget = 120  # a prompt + canvas is ~90 tokens: several side forwards a step
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(43, 3)]
    sp = types.SimpleNamespace(temperature=0.0, max_tokens=GEN, extra_args=None, stop=None)
    got = engine.generate(prompts, sp)
    refs = [generate(ck.model, [p], engine_cfg.replace(gen_length=GEN), ck.special) for p in prompts]
    assert got == [response_ids(r.tokens[0], ck.special) for r in refs]
    assert engine.stats["forwards"] == sum(r.nfe[0] for r in refs)
    assert engine.stats["requests"] == 3


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_jump_share_requests_in_a_batch_decode_within_the_step_width(fmt):
    """Four jump-share requests at once: each step's canvas is the batch's share (knobs.step_width,
    as vLLM's scheduler gives it after the previous step), narrower than the canvas of a request
    alone and wider than the window; every plan fits its step (the emulator asserts it), drafts are
    still accepted, and each response is the reference loop's for that prompt alone."""
    from vllm_odb.engine.knobs import canvas_width, step_width

    ck, engine_cfg, engine = _jump_batch_decodes_as_alone(fmt, 128)
    shift = ck.model.spec.logits_shift
    width, four = canvas_width(engine_cfg, shift), step_width(engine_cfg, shift, 4)
    assert BLOCK + shift < four < width and engine.slots_seen[0] == four
    assert set(engine.slots_seen) <= {step_width(engine_cfg, shift, b) for b in range(1, 5)}
    assert engine.stats["drafts_accepted"] > 0


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_a_jump_share_batch_overlaps_where_no_draft_fits(fmt, monkeypatch):
    """Four jump-share requests whose share of the draft budget is the window (ridge 64 / 4): no
    plan, so the sampler reads those steps' outcomes at the next step (overlap); as requests end
    the share widens, plans come back and outcomes are read in the step. Each response is the
    reference loop's for that prompt alone (its NFE is not: alone, a request drafts more). (Dream's
    worked checkpoint: at three requests its share holds a shared-KV draft only, an approximation
    that changes tokens there; its responses are those of the same batch read in the step.)"""
    from vllm_odb.engine import sampler as sampler_mod
    from vllm_odb.engine.knobs import step_width

    later = []
    real = sampler_mod.Outcome.later.__func__
    monkeypatch.setattr(sampler_mod.Outcome, "later", classmethod(lambda cls, *a: later.append(1) or real(cls, *a)))
    approximate = WORKED and fmt == "dream"
    ck, engine_cfg, engine = _jump_batch_decodes_as_alone(fmt, 64, per_window_row=True, alone=not approximate)
    if approximate:
        monkeypatch.setenv("VLLM_ODB_OVERLAP", "0")
        _, _, in_step = _jump_batch_decodes_as_alone(fmt, 64, per_window_row=True, alone=False)
        assert engine.responses == in_step.responses
    shift = ck.model.spec.logits_shift
    assert step_width(engine_cfg, shift, 4) == BLOCK + shift < step_width(engine_cfg, shift, 2)
    assert later and engine.stats["drafts_accepted"] > 0  # both kinds of step ran


def _jump_batch_decodes_as_alone(fmt: str, ridge_rows: int, per_window_row: bool = False, alone: bool = True):
    """Four jump-share requests at once through the emulated engine (threshold 1.0, ``ridge_rows``,
    + 4 with Dream's shifted window when ``per_window_row``, so that its share at four requests is
    the window too): each response must be the reference loop's for that prompt alone. Returns the
    checkpoint, the engine's config and the engine. Drafts fill one position (full-block drafts fit
    any share above the window): an accepted one then reaches the state plain steps would (one
    commit a step at 1.0), whatever the share; the shared-KV layout reads the base branch's keys for
    the drafted positions, an approximation that changes tokens on the worked checkpoints."""
    ck = _ckpt(fmt)
    shift = ck.model.spec.logits_shift
    engine_cfg = engine_config({"odb": {"block_length": BLOCK, "gen_length": GEN, "method": "odb", "threshold": 1.0,
                                        "max_draft_positions": 1,
                                        "ridge_rows": ridge_rows + (4 * shift if per_window_row else 0)}})
    engine = EmulatedEngine(ck, engine_cfg, slots=4)
    prompts = [ck.encode_chat(e.prompt) for e in make_suite(45, 4)]
    # The basic checkpoints' answers end early, one after another; the worked ones' run past the
    # canvas, so they get canvases of 1 to 4 blocks to end so: the live batch's share of the budget
    # widens as they do.
    gens = [BLOCK * (i + 1) for i in range(len(prompts))] if WORKED else [GEN] * len(prompts)
    sps = [types.SimpleNamespace(temperature=0.0, max_tokens=g, extra_args=None, stop=None) for g in gens]
    got = engine.generate(prompts, sps)
    refs = [generate(ck.model, [p], engine_cfg.replace(gen_length=g), ck.special) for p, g in zip(prompts, gens)]
    engine.responses = got
    if alone:
        assert got == [response_ids(r.tokens[0], ck.special) for r in refs]
    return ck, engine_cfg, engine


def test_a_requests_own_ridge_rows_above_the_engines_still_drafts():
    """A request asking for more draft rows than the engine's ridge_rows plans within the engine's
    (its plans would not fit the scheduled canvas otherwise, and would be dropped: no drafts)."""
    ck = _ckpt("llada")
    engine_cfg = engine_config({"odb": {"block_length": BLOCK, "gen_length": GEN, "method": "odb", "threshold": 1.0,
                                        "ridge_rows": 64}})
    engine = EmulatedEngine(ck, engine_cfg)
    prompt = ck.encode_chat(make_suite(41, 1)[0].prompt)
    runs = []
    for extra in (None, {"ridge_rows": 1000}):
        sp = types.SimpleNamespace(temperature=0.0, max_tokens=GEN, extra_args=extra, stop=None)
        (out,) = engine.generate([prompt], sp)
        runs.append((out, engine.stats["drafts_accepted"], engine.stats["forwards"]))
    ref = generate(ck.model, [prompt], engine_cfg.replace(gen_length=GEN), ck.special)
    assert runs[0][0] == response_ids(ref.tokens[0], ck.special) and runs[0][1] > 0
    assert runs[1] == runs[0]  # the engine's budget: the same drafts and forwards
