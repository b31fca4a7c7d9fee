"""Trace replay (bench/replay.py, through policies/forcing.py): a trace recorded on a trained
checkpoint, forced onto another model, makes the same forwards (the shapes the speed benchmarks
time at full size)."""

from __future__ import annotations

import pytest
import torch

from vllm_odb.bench.replay import Recorder, Replay, generate_traced
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.forcing import force_commits, forced_counts, forced_ends, forced_lengths
from vllm_odb.reference.loader import load_checkpoint
from vllm_odb.reference.model import DiffusionLM, init_weights

from shipped import ANSWER_GEN, WORKED, make_suite

SHAPE_STATS = ("canvas_length", "refresh_tokens", "query_rows", "cached_forwards")


_CHECKPOINTS: dict = {}


def _ck(fmt):
    if fmt not in _CHECKPOINTS:
        _CHECKPOINTS[fmt] = load_checkpoint(f"checkpoints/tiny-{fmt}")
    return _CHECKPOINTS[fmt]


def _prompts(ck, n):
    return [ck.encode_chat(e.prompt) for e in make_suite(3, n)]


def test_forced_commits_take_the_most_confident_masked():
    conf = torch.tensor([[0.9, 0.1, 0.8, 0.95], [0.2, 0.3, 0.1, 0.4], [0.2, 0.3, 0.1, 0.4]])
    masked = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, True]])
    rule = torch.tensor([[False, True, False, False]] * 3)
    got = force_commits(rule, conf, masked, torch.tensor([2, 1, 0]))
    assert got.tolist() == [[True, False, True, False], [False, False, False, True],
                            [False, True, False, False]]  # 0: not forced, the rule's decision stays
    assert force_commits(rule, conf, masked, None) is rule


def test_forcing_hooks_are_none_unless_some_request_is_forced():
    r = Replay.from_dict({"commits": [[3, 1], [4]], "lengths": [64, 32]})
    assert forced_counts([None, None], [0, 0], [0, 0], "cpu") is None
    assert forced_lengths([None], [0], torch.tensor([64]), "cpu") is None
    assert forced_ends([None], [0], "cpu") is None
    assert forced_counts([r, None], [0, 0], [1, 0], "cpu").tolist() == [1, 0]
    assert forced_lengths([None, r], [0, 1], torch.tensor([64, 64]), "cpu").tolist() == [-1, 32]
    assert forced_ends([r, None, r], [0, 0, 1], "cpu").tolist() == [0, -1, 1]


def test_replay_validates_and_round_trips():
    r = Replay.from_dict({"commits": [[3, 1], [4]], "lengths": [64, 32]})
    assert r.blocks == 2 and r.count(0, 1) == 1 and r.count(0, 5) == 1 and r.length(1, 64) == 32
    assert r.last(1) and not r.last(0)
    assert Replay.from_dict(r.to_dict()) == r
    for bad in ({"commits": [[0]], "lengths": [8]}, {"commits": [[1]], "lengths": []}, {"commits": [[1]]},
                {"commits": [[1]], "lengths": [8], "x": 1}, {"commits": [], "lengths": []}, [1, 2],
                {"commits": [[True]], "lengths": [8]}, {"commits": 3, "lengths": [8]}):
        with pytest.raises(ValueError, match="replay"):
            Replay.from_dict(bad)


def test_recorder_counts_commits_per_forward():
    rec = Recorder(2)
    rec.block(torch.tensor([True, True]), torch.tensor([32, 32]))
    before = torch.tensor([[True, True, True], [True, False, False]])
    after = torch.tensor([[False, True, False], [False, False, False]])
    rec.step(before, after)
    rec.step(after, torch.zeros_like(after))
    rec.set_lengths(torch.tensor([True, False]), torch.tensor([16, 8]))
    assert rec.traces() == [{"commits": [[2, 1]], "lengths": [16]}, {"commits": [[1]], "lengths": [32]}]


@pytest.mark.parametrize("fmt,method", [("llada", "vanilla"), ("dream", "fast-dllm"), ("dream", "odb-alp"),
                                        ("dream", "odb")])
def test_replay_makes_the_recorded_forwards(fmt, method):
    """Same shapes (NFE, query rows, refresh tokens, live canvas) on the trained model and on a
    random-weight model of the same shape, where nothing is ever confident. (Threshold 0.999:
    the basic checkpoints commit most blocks in one forward at 0.9; the worked ones decode at 0.9,
    on a canvas their answers end in when ALP is on, so that it cuts.)"""
    ck = _ck(fmt)
    alp = DecodeConfig.for_method(method).alp
    glen = 32 if method == "vanilla" else ANSWER_GEN if WORKED and alp else 64
    knobs = {} if method == "vanilla" else {"threshold": 0.9 if WORKED else 0.999}
    if method == "odb":
        knobs["ridge_rows"] = 64  # the draft budget (a knob of jump-share methods only)
    cfg = DecodeConfig.for_method(method, gen_length=glen, block_length=16, **knobs)
    prompts = _prompts(ck, 2)
    rec = generate_traced(ck.model, prompts, cfg, ck.special, record=True)
    traces = [Replay.from_dict(t) for t in rec.stats["trace"]]
    assert any(len(steps) > 1 for t in traces for steps in t.commits)  # several forwards in a block
    if cfg.alp:
        assert any(min(t.lengths) < glen for t in traces)  # ALP cut something: the replay must too
    rand = DiffusionLM(ck.model.spec)
    init_weights(rand, seed=0)
    for model in (ck.model, rand):
        rep = generate_traced(model, prompts, cfg, ck.special, replay=traces, record=True)
        assert rep.nfe == rec.nfe and rep.forwards == rec.forwards
        for key in SHAPE_STATS:
            if key == "query_rows" and cfg.jump and WORKED:
                # A trace holds commit counts, not positions: where the worked model's steps commit
                # several positions, a replay may commit others, and Dream's draft rows follow where
                # the masked positions lie (2 rows each, shared by neighbours): up to ~5% on v8.
                # (The engine's jump-share steps run their scheduled canvas whatever rows the drafts
                # fill, and the roofline counts that canvas: the speed rows are unaffected.)
                assert all(abs(a - b) <= 0.06 * b for a, b in zip(rep.stats[key], rec.stats[key])), key
            else:
                assert rep.stats[key] == rec.stats[key], key
        if not cfg.jump:
            assert rep.stats["trace"] == rec.stats["trace"]
    if not cfg.jump:  # on its own model the forced commits are the threshold's own
        assert generate_traced(ck.model, prompts, cfg, ck.special, replay=traces).tokens == rec.tokens


def test_replay_needs_one_trace_per_prompt():
    ck = _ck("llada")
    cfg = DecodeConfig.for_method("fast-dllm", gen_length=64, block_length=32)
    with pytest.raises(ValueError, match="traces for 2 prompts"):
        generate_traced(ck.model, _prompts(ck, 2), cfg, ck.special, replay=[Replay(((32,), (32,)), (64, 64))])
