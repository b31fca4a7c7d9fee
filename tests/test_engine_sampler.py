"""The engine sampler's index math on CPU with real tensors (vllm_odb/engine/sampler.py), through
the runner's entry points only (tests/engine_stubs.py: ``table.add`` and ``sampler(logits,
batch)``): the rows of a refresh forward that ALP reads and the branch rows a jump-share step
decides from must be the ones the reference loop uses. The model is a stand-in whose hidden states
are the logits. (tests/test_engine_parity.py runs whole requests against the reference loop.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from engine_stubs import EOS, MASK, VOCAB, Engine, window  # noqa: E402
from vllm_odb.engine.requests import JumpPlan  # noqa: E402
from vllm_odb.engine.sampler import token_chunks  # noqa: E402
from vllm_odb.policies import DecodeConfig, decide  # noqa: E402
from vllm_odb.policies.adaptive import BlockThresholds, streaming_threshold  # noqa: E402
from vllm_odb.policies.jump import accept  # noqa: E402
from vllm_odb.policies.length import canvas_predictions, predict_length  # noqa: E402


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("eos_at", [5, 40, None])
def test_alp_reads_the_reference_rows(shift, eos_at):
    """The refresh of a request resumed at block 1 (its rows come after another request's in the
    side forward): ALP predicts from rows s - shift .. end - shift, as the reference loop does."""
    cfg = DecodeConfig(gen_length=64, block_length=16, alp=True, early_stop=True)
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(5 + 64, VOCAB, generator=g)  # request a's refresh row of each position
    if eos_at is not None:  # canvas position eos_at is confidently EOS: its row is position - shift
        seq[5 + eos_at - shift, EOS] = 30.0
    other = 7 + 64  # request b's sequence (prompt + canvas) comes first in the side forward
    engine = Engine(cfg, shift, refresh_logits=lambda ids, pos: torch.cat([torch.zeros(other, VOCAB), seq[pos[other:]]]))
    engine.add(1, "b", [1] * 7, None)
    prompt = list(range(1, 6))
    req = engine.add(0, "a", prompt, prompt + [3] * 16)  # block 0 committed: ALP at block 1
    assert (req.prompt_len, req.start, req.gen) == (5, 21, 64)
    scan = engine.table.tokens[0, 21:69] == MASK
    engine.prefill_done([1, 0])
    assert engine.forwards[0]["bounds"] == [(0, other), (other, other + 69)]
    # The reference loop (reference/generate.py, the refresh's ALP): rows s - shift .. end - shift.
    x0, conf = canvas_predictions(seq[21 - shift: 69 - shift], MASK)
    want = predict_length(x0[None], conf[None], scan[None], 16, torch.tensor([64]), [(EOS,)], cfg.alp_threshold,
                          16, cfg.alp_min_length)
    assert req.gen == int(want[0]) == (64 if eos_at in (None, 5) else 48)  # 5 is in the committed block
    assert req.stats["canvas_predicted"] == req.gen


@pytest.mark.parametrize("shift", [0, 1])
def test_jump_step_decides_each_branch_from_its_rows(shift):
    """A planned request (its rows after another request's): every branch decides from the rows
    ``pred_row`` names, the chain rule picks the branch, its block and drafted count are taken,
    and the next step's plan comes from the adopted branch's predictions."""
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, threshold=0.8, ridge_rows=64)
    engine = Engine(cfg, shift)
    engine.add(1, "b", [1, 2, 3])  # undecided: one commit per step, its block goes on
    req = engine.add(0, "a", [1, 2, 3, 4])
    engine.table.tokens[0, 6] = 5
    g = torch.Generator().manual_seed(1)
    block = engine.block(0).clone()
    x0, conf = torch.randint(0, 8, (8,), generator=g), torch.rand(8, generator=g)
    plan = JumpPlan.plan(block, engine.table.tokens[0, 4 - shift:4], x0, conf, MASK, req.cfg, 2, engine.width)
    req.plan = plan
    logits = torch.randn(engine.width, VOCAB, generator=g)
    engine.decode({1: window(engine.width), 0: logits})
    # The reference loop (reference/generate.py branch_forward): branch logits through pred_row.
    nb = plan.branches.blocks.shape[1]
    lg = logits[plan.pred_row.reshape(-1)].view(nb, 8, VOCAB)
    bx0, bconf, bcommit = decide(lg, (plan.branches.blocks[0] == MASK) & (block == MASK).any(), cfg, MASK)
    c = int(accept(bcommit[None], bx0[None], plan.branches.positions, plan.branches.drafted, plan.branches.family,
                   plan.branches.valid)[0])
    new = torch.where(bcommit[c], bx0[c], plan.branches.blocks[0, c])
    assert torch.equal(engine.block(0), new)
    assert req.stats["drafts_accepted"] == (0 if c == 0 else int(plan.branches.family[c - 1].sum()))
    nxt = JumpPlan.plan(new, engine.table.tokens[0, 4 - shift:4], bx0[c], bconf[c], MASK, req.cfg, 2,
                        engine.sampler.next_width)
    assert torch.equal(req.plan.tokens, nxt.tokens) and torch.equal(req.plan.branches.drafted, nxt.branches.drafted)
    rows = engine.draft_rows(0)  # written for the next step: the plan's rows
    assert torch.equal(rows[:nxt.num_rows], nxt.tokens)


def test_a_refreshed_jump_request_writes_its_first_plan_to_the_draft_slots():
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, ridge_rows=64)
    engine = Engine(cfg, 1, refresh_logits=lambda ids, pos: torch.zeros(len(ids), VOCAB))  # one commit
    req = engine.add(1, "a", [1, 2, 3, 4])
    engine.prefill_done([1])
    assert req.plan is not None and req.block_step == 1
    rows = engine.draft_rows(1)
    assert torch.equal(rows[: req.plan.num_rows], req.plan.tokens)
    assert torch.equal(rows[:9], engine.table.tokens[1, 3:12])  # the base window: the token before, the block


@pytest.mark.parametrize("early_stop", [False, True])
def test_block_emitting_an_end_marker_counts_the_request_at_once(early_stop):
    """vLLM stops a request on the block that emits its EOS; its stats must reach the metrics in
    that step, not when vLLM's removal reaches the worker (maybe never, on an idle engine)."""
    cfg = DecodeConfig(gen_length=32, block_length=8, early_stop=early_stop)
    engine = Engine(cfg)
    req = engine.add(0, "a", [1, 2, 3, 4])
    logits = window(8, {r: (3, 0.99) for r in range(8)} | {2: (EOS, 0.99)})  # all confident, one EOS
    out = engine.decode({0: logits})
    assert int(out.num_sampled[0]) == 8 and out.sampled_token_ids[0, 2] == EOS
    assert req.counted and req.finished == early_stop
    assert engine.table.counters.totals["requests"] == 1 and engine.table.counters.totals["forwards"] == 1
    engine.table.remove("a")
    assert engine.table.counters.totals["requests"] == 1  # counted once


def test_replay_forces_the_recorded_commits_and_end():
    """Benchmarks' trace replay on the engine: the recorded count commits (the most confident
    masked positions), the request ends after the trace's last block, whatever the model says."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg)
    req = engine.add(0, "a", [1, 2, 3, 4], replay={"commits": [[1, 3, 4]], "lengths": [32]})
    assert req.forcing is not None and req.forcing.blocks == 1
    req.block_step = 1  # the refresh took the first recorded step
    engine.table.tokens[0, 4] = 3  # ... and committed one token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, VOCAB, generator=g)
    logits[:, EOS] = -30.0  # no end marker from the model
    logits[:, 5] = 30.0  # every position over the threshold: the rule would commit all 7
    assert int(engine.decode({0: logits}).num_sampled[0]) == 0
    assert int((engine.table.tokens[0, 4:12] == MASK).sum()) == 4  # 7 masked - 3 recorded
    assert int(engine.decode({0: logits}).num_sampled[0]) == 8  # 4 more: the block is done
    assert req.finished  # the trace's last block, though the model predicted no EOS


def test_replay_arg_is_validated():
    from vllm_odb.engine.knobs import request_config

    with pytest.raises(ValueError, match="extra_args: replay"):
        request_config(DecodeConfig(gen_length=32, block_length=8), {"replay": {"commits": [[0]], "lengths": [8]}})


def test_a_window_the_scheduler_cut_short_decides_nothing():
    """The scheduler may give a running request fewer canvas slots than the window (token budget,
    max_model_len). That row's logits are not a block: it must commit nothing and reject every
    slot it got (vLLM's computed count stays put), and never read another row's logits."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg)
    a = engine.add(0, "a", [1, 2, 3, 4])
    b = engine.add(1, "b", [1, 2, 3])
    before = engine.table.tokens[1].clone()
    logits = torch.zeros(8 + 5, VOCAB)
    logits[:3, 3] = 10.0  # a: three confident positions; the rest (and all of b's rows) are not
    out = engine.decode({0: logits[:8], 1: logits[8:]})
    assert out.num_sampled.tolist() == [0, 0]
    assert out.num_rejected.tolist() == [8, 5]
    tokens = engine.table.tokens
    assert a.stats["forwards"] == 1 and (tokens[0, 4:7] == 3).all() and (tokens[0, 7:12] == MASK).all()
    assert b.start == 3 and torch.equal(tokens[1], before) and b.stats["forwards"] == 0


def test_dynamic_threshold_on_the_engine_is_the_reference_policy():
    """Streaming-dLLM's tau = threshold * (1 - alpha * (1 - r_mask)) over the block and the canvas
    after it: the engine commits what policies.adaptive decides for the same tokens, which here
    is more than the fixed threshold would."""
    cfg = DecodeConfig(gen_length=32, block_length=8, threshold=0.9, threshold_alpha=0.5)
    engine = Engine(cfg)
    req = engine.add(0, "a", [1, 2, 3, 4])
    engine.table.tokens[0, 4:7] = 5  # three block positions decoded: r_mask = 29 / 32
    logits = window(8, {3: (3, 0.87), 4: (3, 0.8), 5: (3, 0.88), 7: (3, 0.86)}, base=0.5)
    masked = (engine.table.tokens[0, 4:12] == MASK)[None]
    tau = streaming_threshold(cfg, engine.table.tokens[0, 4:36][None], torch.ones(1, 32, dtype=torch.bool), MASK)
    assert 0.85 < float(tau[0]) < 0.87
    _, _, want = decide(logits[None], masked, cfg, MASK, threshold=tau)
    _, _, fixed = decide(logits[None], masked, cfg, MASK)
    assert int(want.sum()) == 3 and int(fixed.sum()) == 1  # the dynamic threshold lets 0.86-0.88 in
    before = engine.table.tokens[0, 4:12].clone()
    engine.decode({0: logits})
    assert torch.equal(engine.table.tokens[0, 4:12] != before, want[0])
    assert req.stats["forwards"] == 1


def test_apd_on_the_engine_carries_the_reference_state_across_steps():
    """Dynamic-dLLM's APD: per-position thresholds updated at every forward of a block from this
    and the previous forward's distributions (policies.adaptive.BlockThresholds, which the
    engine keeps on the request and resets at each refresh). Two engine steps commit what the
    reference policy decides over the same logits."""
    cfg = DecodeConfig(gen_length=32, block_length=8, rule="adaptive", threshold=0.9, apd_alpha=0.1, apd_beta=0.05)
    engine = Engine(cfg)
    req = engine.add(0, "a", [1, 2, 3, 4])
    req.thresholds = BlockThresholds(cfg, MASK)  # what the block's refresh step sets up
    ref = BlockThresholds(cfg, MASK)
    x = engine.table.tokens[0, :36].clone()
    committed = []
    for conf in ({0: (3, 0.95)}, {1: (3, 0.85), 2: (3, 0.84), 3: (3, 0.83)}):
        logits = window(8, conf)
        masked = (x[4:12] == MASK)[None]
        thr = ref.step(logits[None], x[None, 4:], torch.ones(1, 32, dtype=torch.bool))
        x0, _, commit = decide(logits[None], masked, cfg, MASK, threshold=thr)
        x[4:12] = torch.where(commit[0], x0[0], x[4:12])
        engine.decode({0: logits})
        assert torch.equal(engine.table.tokens[0, :36], x)
        committed.append(int(commit.sum()))
    assert committed == [1, 3]  # the second step's bar fell below 0.9 (APD), not the fixed rule's 1


def test_token_chunks_stay_within_the_budget():
    assert token_chunks([5, 5, 5], 10) == [(0, 2), (2, 3)]
    assert token_chunks([12, 3, 4], 10) == [(0, 1), (1, 3)]  # a long item alone
    assert token_chunks([3, 3], 100) == [(0, 2)]
    assert token_chunks([], 10) == []


@pytest.mark.parametrize("shift", [0, 1])
def test_refresh_in_chunks_of_the_token_budget_decides_the_same(shift):
    """Refresh side forwards are cut to the runner's token budget (the activation size vLLM's
    memory profile measured); the blocks they commit do not depend on the cut."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    outcomes = []
    for budget in (10_000, 45):
        engine = Engine(cfg, shift, max_num_tokens=budget)
        reqs = [engine.add(i, f"r{i}", list(range(1, 4 + i))) for i in range(2)]
        engine.prefill_done([0, 1])
        sizes = [len(f["ids"]) for f in engine.forwards]
        assert max(sizes) <= budget or len(sizes) == 2
        outcomes.append((len(sizes), engine.table.tokens.clone(), [q.stats["forwards"] for q in reqs]))
    (n_one, tok_one, fw_one), (n_cut, tok_cut, fw_cut) = outcomes
    assert (n_one, n_cut) == (1, 2)
    assert torch.equal(tok_one, tok_cut) and fw_one == fw_cut == [1, 1]
    assert (tok_one != MASK).sum() > 7  # something was committed


@pytest.mark.parametrize("start,gen,window_", [(5, 64, 16), (5, 64, 60), (37, 64, 16), (53, 64, 16), (21, 48, 8)])
def test_suffix_pruning_keeps_the_reference_positions(start, gen, window_):
    """Streaming-dLLM's pruned canvas on the engine (``ODBRequest.kept``) is the reference's
    (policies.streaming.pruned_suffix): the block, the window and the final position."""
    from vllm_odb.policies.streaming import pruned_suffix

    cfg = DecodeConfig(gen_length=gen, block_length=16, suffix_window=window_)
    engine = Engine(cfg)
    plen = 5
    committed = list(range(1, plen + 1)) + [3] * (start - plen)
    q = engine.add(0, "a", list(range(1, plen + 1)), committed)
    assert q.start == start
    pos, valid = pruned_suffix(torch.tensor([plen]), start - plen, start - plen + 16, torch.tensor([gen]), window_)
    want = pos[0][valid[0]].tolist()
    stop, final = q.kept()
    assert list(range(start, stop)) + ([] if final is None else [final]) == want
    assert q.suffix_cols() == want[16:]
    assert q.keys == start + len(want) == stop + (final is not None)


@pytest.mark.parametrize("shift", [0, 1])
def test_pruned_refresh_puts_the_final_position_after_the_window(shift):
    """The refresh of a pruned block runs over [0, stop) plus the final position at its true id,
    whose keys and values land in the cache slot right after the window (so a step's keys are the
    contiguous slots [0, keys)); it counts only those tokens."""
    cfg = DecodeConfig(gen_length=64, block_length=16, suffix_window=8)
    engine = Engine(cfg, shift)
    q = engine.add(0, "a", [1, 2, 3, 4, 5])
    engine.prefill_done([0])
    (seen,) = engine.forwards
    stop = 5 + 16 + 8
    assert seen["pos"].tolist() == list(range(stop)) + [5 + 64 - 1]
    assert seen["ids"][-1] == MASK and seen["bounds"] == [(0, stop + 1)]
    bt = engine.paged.block_tables[0]
    assert seen["slots"].tolist() == [int(bt[p // 4]) * 4 + p % 4 for p in range(stop + 1)]
    assert q.keys == stop + 1 and q.stats["refresh_tokens"] == stop + 1


def test_dynamic_threshold_under_pruning_counts_the_seen_suffix():
    """With suffix pruning the dynamic threshold's masked ratio is over the block and the suffix
    the step sees (window + final position), as in the reference loop's pruned sequence."""
    cfg = DecodeConfig(gen_length=64, block_length=16, suffix_window=8, threshold_alpha=0.5)
    engine = Engine(cfg)
    q = engine.add(0, "a", [1, 2, 3, 4, 5])
    engine.table.tokens[0, 5:15] = 3  # 10 of the block's 16 decoded
    seen = torch.cat([engine.table.tokens[0, 5:21], engine.table.tokens[0, q.suffix_cols()]])[None]  # 16 + 8 + 1
    tau = streaming_threshold(cfg, seen, torch.ones_like(seen, dtype=torch.bool), MASK)  # r_mask 15 / 25: 0.72
    whole = streaming_threshold(cfg, engine.table.tokens[0, 5:69][None], torch.ones(1, 64, dtype=torch.bool), MASK)
    assert float(tau[0]) < 0.8 < float(whole[0])  # r_mask 54 / 64 without pruning: 0.83
    logits = window(16, {10: (3, 0.85), 11: (3, 0.81), 12: (3, 0.3)})
    engine.decode({0: logits})
    masked = seen[:, :16] == MASK
    _, _, want = decide(logits[None], masked, cfg, MASK, threshold=tau)
    _, _, unpruned = decide(logits[None], masked, cfg, MASK, threshold=whole)
    assert torch.equal(engine.table.tokens[0, 5:21] != seen[0, :16], want[0])
    assert int(want.sum()) == 2 and int(unpruned.sum()) == 1  # the seen suffix's ratio lets 0.81 in


def test_refresh_chunk_size_is_the_runners_token_budget_unless_overridden(monkeypatch):
    cfg = DecodeConfig(gen_length=32, block_length=8)
    monkeypatch.delenv("VLLM_ODB_REFRESH_TOKENS", raising=False)
    assert Engine(cfg).sampler.refresh_budget == 4096  # the runner's max_num_tokens
    monkeypatch.setenv("VLLM_ODB_REFRESH_TOKENS", "123")
    assert Engine(cfg).sampler.refresh_budget == 123


def test_the_step_profiler_attaches_only_when_asked(monkeypatch, tmp_path):
    """Benchmarks' step profiler (bench/profile.py): the sampler's step observer when
    VLLM_ODB_PROFILE names a file, one JSON line per step; None when serving."""
    import json

    cfg = DecodeConfig(gen_length=32, block_length=8)
    monkeypatch.delenv("VLLM_ODB_PROFILE", raising=False)
    assert Engine(cfg).sampler.observer is None
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv("VLLM_ODB_PROFILE", str(path))
    engine = Engine(cfg, refresh_logits=lambda ids, pos: torch.zeros(len(ids), VOCAB))  # one commit a step
    engine.add(0, "a", [1, 2, 3, 4])
    engine.add(1, "b", [1, 2, 3])
    engine.prefill_done([0, 1])
    engine.decode({0: window(8), 1: window(8)})
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert first["step_s"] is None and (first["refresh_reqs"], first["decode_reqs"]) == (2, 0)
    assert first["refresh_tokens"] == (4 + 32) + (3 + 32) and first["refresh_s"] > 0
    assert second["step_s"] > 0 and (second["refresh_reqs"], second["decode_reqs"]) == (0, 2)
    assert second["kv_tokens"] == 36 + 35 and second["refresh_s"] == 0.0 and second["reqs"] == 2


# ---- overlap: a decode step's outcome is read at the next step ----------------------------------
def _confident(rows: int = 8) -> torch.Tensor:
    return window(rows, {r: (3, 0.99) for r in range(rows)})


def test_overlap_reads_a_step_outcome_at_the_next_step():
    """With overlap (the default but for jump-share) the step that completes a block emits nothing
    and leaves the host untouched: its outcome waits on the sampler. The next step reads it: the
    block goes out in that step's row, whose forward decided nothing (an idle forward), and the
    next block starts with a refresh there. The tokens are the same as without overlap."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    got = {}
    for overlap in (False, True):
        engine = Engine(cfg, overlap=overlap)
        req = engine.add(0, "a", [1, 2, 3, 4])
        first = engine.decode({0: _confident()})
        if overlap:
            assert int(first.num_sampled[0]) == 0 and int(first.num_rejected[0]) == 8
            assert req.start == 4 and req.stats["forwards"] == 0 and engine.sampler._pending
            assert not engine.forwards  # no refresh yet
            blocks = engine.table.tokens[0, 4:12].clone()
            second = engine.decode({0: window(8)})  # the completed block's window again: not read
            assert torch.equal(engine.table.tokens[0, 4:12], blocks)
            assert req.stats["idle_forwards"] == 1
        else:
            second = first
        assert int(second.num_sampled[0]) == 8 and int(second.num_rejected[0]) == 0
        assert torch.equal(second.sampled_token_ids[0, :8], torch.full((8,), 3))
        assert req.start == 12 and req.stats["forwards"] == 2 and len(engine.forwards) == 1  # decode + refresh
        got[overlap] = engine.table.tokens[0].clone()
    assert torch.equal(got[False], got[True])


@pytest.mark.parametrize("mode", ["1", "always"])
def test_a_step_that_must_complete_its_block_is_read_in_the_step(mode, monkeypatch):
    """Overlap's one exception: a request whose block had one mask left after its last settled
    step completes it in this step (a step commits a token at least), so this step's outcome is
    read now. The block goes out and the refresh runs in this step, and no idle forward follows:
    deferred, the next step would run the completed block again. ``VLLM_ODB_OVERLAP=always``
    defers it as before. Tokens are the same either way."""
    monkeypatch.setenv("VLLM_ODB_OVERLAP", mode)
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg, overlap=True)
    req = engine.add(0, "a", [1, 2, 3, 4])
    engine.decode({0: window(8, {r: (3, 0.99) for r in range(7)})})  # seven commit, one mask left
    assert engine.sampler._pending and req.masks_left is None  # not read yet
    out = engine.decode({0: window(8)})  # reads the last step (one left), then commits the last mask
    if mode == "1":
        assert not engine.sampler._pending and req.masks_left is None  # a new block: unknown again
        assert int(out.num_sampled[0]) == 8 and req.start == 12 and len(engine.forwards) == 1
    else:
        assert engine.sampler._pending and req.masks_left == 1 and int(out.num_sampled[0]) == 0
        out = engine.decode({0: window(8)})  # the idle forward
        assert int(out.num_sampled[0]) == 8 and req.start == 12 and len(engine.forwards) == 1
    assert req.stats["idle_forwards"] == (0 if mode == "1" else 1) and req.stats["forwards"] == 3
    assert torch.equal(engine.table.tokens[0, 4:12], torch.full((8,), 3))


def test_which_steps_are_expected_to_complete_their_blocks():
    """One mask left completes a block in any step; two do in a step with drafts (its draft fills
    one), not in a jump-share step without (temperature > 0, or no room in the batch's share). A
    block whose count is unknown (its first step after a refresh) or a batch with one request
    further off is not expected to complete."""
    import types

    from vllm_odb.engine.sampler import ODBSampler

    def q(left):
        return types.SimpleNamespace(masks_left=left)

    def expect(reqs, drafted=()):
        return ODBSampler._completes_every_block(reqs, {id(r) for r in drafted})

    one, two, three = q(1), q(2), q(3)
    assert expect([one]) and expect([one, q(1)]) and expect([two], [two]) and expect([one, two], [two])
    assert not expect([two]) and not expect([three], [three]) and not expect([q(None)]) and not expect([])
    assert not expect([one, q(4)]) and not expect([one, two], [one])  # two left, no draft this step


def test_a_jump_share_step_with_two_masks_and_a_draft_is_read_in_the_step():
    """Alone (drafts fit), a jump-share block with two masks left: its next step carries a draft
    filling one of them, so that step is read in the step (no outcome waits)."""
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, ridge_rows=16)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    engine.decode({0: window(8, {r: (3, 0.99) for r in range(6)})})  # six commit, two left
    assert engine.sampler._pending and a.plan is not None and a.plan.num_rows > a.plan.window
    engine.decode({0: window(a.plan.num_rows)})
    assert a.masks_left in (None, 1) and not engine.sampler._pending


def test_a_batch_is_read_in_the_step_only_when_every_block_must_complete():
    """At batch 2, one request with a mask left and one with more: the step defers as usual (a
    sync would stall both for one request's idle rows, nearly free in a batch)."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    b = engine.add(1, "b", [1, 2, 3])
    engine.decode({0: window(8, {r: (3, 0.99) for r in range(7)}), 1: window(8)})
    engine.decode({0: window(8), 1: window(8)})
    assert (a.masks_left, b.masks_left) == (1, 7) and engine.sampler._pending


def test_overlap_variable_values_are_checked(monkeypatch):
    monkeypatch.setenv("VLLM_ODB_OVERLAP", "sometimes")
    with pytest.raises(ValueError, match="VLLM_ODB_OVERLAP='sometimes'"):
        Engine(DecodeConfig(gen_length=32, block_length=8), overlap=True)


def test_overlap_keeps_an_outcome_until_its_request_has_a_row():
    """A block completed, then the scheduler cut the request's next window short: that row can
    carry no block, so it rejects every slot and the outcome waits; the block goes out at the
    request's next full window. A request that left before its outcome was read is dropped."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    b = engine.add(1, "b", [1, 2, 3])
    engine.decode({0: _confident(), 1: _confident()})  # both blocks complete
    out = engine.decode({0: window(5), 1: window(8)})  # a cut short
    assert out.num_sampled.tolist() == [0, 8] and out.num_rejected.tolist() == [5, 0]
    assert a.start == 4 and b.start == 11 and len(engine.sampler._pending) == 1
    engine.table.remove("b")
    out = engine.decode({0: window(8)})
    assert out.num_sampled.tolist() == [8] and a.start == 12 and not engine.sampler._pending


def test_overlap_fails_non_finite_logits_at_the_next_step_without_output():
    """A NaN step under overlap: the request fails when its outcome is read, and nothing of that
    block goes out; the other request's block does."""
    cfg = DecodeConfig(gen_length=32, block_length=8)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    engine.add(1, "b", [1, 2, 3, 4])
    bad = _confident()
    bad[2] = float("nan")
    engine.decode({0: bad, 1: _confident()})
    assert a.error is None
    out = engine.decode({0: window(8), 1: window(8)})
    assert a.error is not None and out.num_sampled.tolist() == [0, 8] and out.num_nans.tolist() == [1, 0]


def test_jump_share_overlaps_and_plans_on_the_device():
    """Jump-share plans each step from the step before it on the device, before that step's outcome
    is read: it overlaps as a plain engine does (the outcome is read at the next step). Once the
    batch's share of the draft budget is the window (two requests: ridge 16 // 2 = 8 rows, the
    window) no plan is made."""
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, ridge_rows=16)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    engine.decode({0: window(8)})  # alone: 16 rows, drafts fit
    assert engine.sampler._pending and a.stats["forwards"] == 0 and a.plan is not None
    assert a.plan.num_rows == 16
    engine.add(1, "b", [1, 2, 3])
    a.plan = None  # (its plan's rows were not scheduled: fit_plans drops it so)
    engine.decode({0: window(8), 1: window(8)})
    assert engine.sampler._pending and a.stats["forwards"] == 1 and a.plan is None


def test_overlap_is_off_with_the_variable(monkeypatch):
    monkeypatch.setenv("VLLM_ODB_OVERLAP", "0")
    engine = Engine(DecodeConfig(gen_length=32, block_length=8), overlap=True)
    engine.add(0, "a", [1, 2, 3, 4])
    assert int(engine.decode({0: _confident()}).num_sampled[0]) == 8 and not engine.sampler._pending


def test_a_plan_decoded_in_an_overlapped_step_is_spent_at_once():
    """A jump-share request planned alone (drafts fit) whose next step runs in a batch where none fit
    (overlap): that step still decodes its plan, and the plan is spent there. The next step's rows
    are the window of the block as that step left it, not the old plan's (its outcome, read a step
    later, must not leave the plan in place for the draft slots)."""
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, ridge_rows=16)
    engine = Engine(cfg, overlap=True)
    a = engine.add(0, "a", [1, 2, 3, 4])
    engine.decode({0: window(8)})  # alone: 16 rows, drafts fit
    assert a.plan is not None and engine.sampler._pending
    rows = a.plan.num_rows
    engine.add(1, "b", [1, 2, 3])
    engine.decode({0: window(rows), 1: window(8)})  # two requests: the share is the window
    assert engine.sampler._pending and a.plan is None
    assert torch.equal(engine.draft_rows(0)[:8], engine.table.tokens[0, a.start:a.start + 8])


def test_overlap_counts_a_request_end_once_and_its_last_idle_forward():
    """A request whose canvas is done keeps committing EOS blocks until vLLM stops it: its end counts
    once (the step profiler syncs the device on it), and the idle forward of the step that emitted
    its last block reaches the metrics with the rest of its stats."""
    cfg = DecodeConfig(gen_length=8, block_length=8)  # one block
    engine = Engine(cfg, overlap=True)
    req = engine.add(0, "a", [1, 2, 3, 4])
    ends = engine.table.ends
    engine.decode({0: _confident()})  # the block completes
    engine.decode({0: window(8)})  # it goes out: the canvas is done
    assert req.finished and engine.table.ends == ends + 1
    for _ in range(4):  # EOS blocks until vLLM's stop check
        engine.decode({0: window(8)})
    assert engine.table.ends == ends + 1
    totals = engine.table.counters.totals
    assert totals["requests"] == 1 and totals["forwards"] == 1 and totals["idle_forwards"] == 1


def test_a_refresh_that_replayed_cuda_graphs_counts_its_tokens_as_graphed():
    """``refresh_graph_tokens`` (metrics and bench speed's ``refresh_graphed``) counts the tokens of
    refreshes whose forward replayed CUDA graphs (the cache refresh says so); others count only in
    ``refresh_tokens``."""
    cfg = DecodeConfig(gen_length=64, block_length=16)
    engine = Engine(cfg, slots=2)
    a = engine.add(0, "a", [1, 2, 3, 4, 5])
    engine.prefill_done([0])
    assert a.stats["refresh_tokens"] == 5 + 64 and a.stats["refresh_graph_tokens"] == 0
    cache = engine.sampler.cache
    forward = cache.forward

    def graphed_forward(*args):  # as the paged route's forward does after a graph replay
        out = forward(*args)
        cache.graphed = True
        return out

    cache.forward = graphed_forward
    b = engine.add(1, "b", [1, 2, 3])
    engine.prefill_done([1])
    assert b.stats["refresh_tokens"] == b.stats["refresh_graph_tokens"] == 3 + 64
    assert a.stats["refresh_graph_tokens"] == 0


def _record_calls(monkeypatch) -> list[str]:
    """The order in which the sampler runs a refresh's block steps, jump-share plans and ALP cut
    reads (ODBSampler's methods; an empty list of cuts reads nothing and is not recorded)."""
    from vllm_odb.engine import sampler as sampler_mod

    calls: list[str] = []
    for name, tag in (("_block_steps", "step"), ("_plans", "plans"), ("_apply_cuts", "cut")):
        real = getattr(sampler_mod.ODBSampler, name)

        def wrapped(self, *a, _real=real, _tag=tag, **k):
            if _tag != "cut" or a[0]:
                calls.append(_tag)
            return _real(self, *a, **k)
        monkeypatch.setattr(sampler_mod.ODBSampler, name, wrapped)
    return calls


def _ends_after_first_block(shift: int = 0):
    """Refresh logits: every canvas position confidently EOS past the first block (prompt 4, block 8)."""
    def logits(ids, pos):
        out = torch.zeros(len(ids), VOCAB)
        out[:, 3] = 30.0
        out[pos >= 4 + 8 - shift, EOS] = 60.0
        return out
    return logits


def _cut_order(monkeypatch, cfg: DecodeConfig, shift: int = 0) -> tuple[list[str], object]:
    """The calls of one request's refresh whose canvas is confidently cut after the first block."""
    calls = _record_calls(monkeypatch)
    engine = Engine(cfg, shift, refresh_logits=_ends_after_first_block(shift))
    req = engine.add(0, "a", [1, 2, 3, 4])
    engine.prefill_done([0])
    return calls, req


def test_alp_cut_is_read_after_the_refresh_steps_and_plans_launch(monkeypatch):
    """One host read for the refresh's ALP cuts, after its first step and the jump-share plans are
    launched (they read no canvas length), so their launches run behind the refresh on the GPU."""
    cfg = DecodeConfig(gen_length=32, block_length=8, alp=True, alp_min_length=8, jump=True, ridge_rows=64)
    calls, req = _cut_order(monkeypatch, cfg)
    assert calls == ["step", "plans", "cut"]
    assert req.gen < 32 and req.stats["canvas_predicted"] == req.gen  # the cut itself still lands


def test_alp_cut_is_read_before_a_step_whose_threshold_reads_the_canvas(monkeypatch):
    """Streaming-dLLM's dynamic threshold reads the canvas after the block (its length): the cut
    must be on the host before the refresh's first step decides."""
    cfg = DecodeConfig(gen_length=32, block_length=8, alp=True, alp_min_length=8, threshold_alpha=0.5)
    calls, req = _cut_order(monkeypatch, cfg)
    assert calls == ["cut", "step"]
    assert req.gen < 32


@pytest.mark.parametrize("b_alp, chunk_tokens", [(False, 4096), (True, 4096), (False, 40), (True, 40)])
def test_mixed_refresh_reads_the_cut_early_only_for_an_alp_request_whose_threshold_moves(monkeypatch, b_alp,
                                                                                        chunk_tokens):
    """Two requests refresh in one step (one side forward, or one each under a small token budget):
    request a has ALP and the fixed threshold, b Streaming's dynamic threshold with or without ALP.
    Only an ALP request whose threshold reads the canvas makes its chunk read the cut before its
    step; otherwise the cuts wait for the end of the refresh phase, read once."""
    calls = _record_calls(monkeypatch)  # no jump-share here: no plans
    cfg = DecodeConfig(gen_length=32, block_length=8, alp=True, alp_min_length=8)
    engine = Engine(cfg, 0, refresh_logits=_ends_after_first_block(), max_num_tokens=chunk_tokens)
    a = engine.add(0, "a", [1, 2, 3, 4])
    b = engine.add(1, "b", [1, 2, 3, 4], alp=b_alp, threshold_alpha=0.5)
    engine.prefill_done([0, 1])
    chunks = 2 if chunk_tokens < 72 else 1
    if chunks == 1:
        assert calls == (["cut", "step"] if b_alp else ["step", "cut"])
    else:  # a's chunk defers its cut; b's reads its own first when it has ALP
        assert calls == (["step", "cut", "step", "cut"] if b_alp else ["step", "step", "cut"])
    assert a.gen < 32 and (b.gen < 32) == b_alp


@pytest.mark.parametrize("chunk_tokens", [4096, 40])
def test_the_step_report_counts_the_refresh_tokens_run_before_alp_cuts_them(chunk_tokens):
    """The step profiler's refresh tokens are those the refresh forwards ran (the whole canvas), not
    the canvases ALP left by the end of the step: session 14's batch-8 refresh steps were measured
    against the cut canvases, ~4x too few tokens."""
    cfg = DecodeConfig(gen_length=32, block_length=8, alp=True, alp_min_length=8)
    engine = Engine(cfg, 0, refresh_logits=_ends_after_first_block(), max_num_tokens=chunk_tokens)
    reports = []
    engine.sampler.observer = type("Observer", (), {"refresh_started": lambda self: None,
                                                    "step_ended": lambda self, r: reports.append(r)})()
    a = engine.add(0, "a", [1, 2, 3, 4])
    b = engine.add(1, "b", [1, 2, 3])
    engine.prefill_done([0, 1])
    report = next(r for r in reports if r.refreshed)
    assert report.refresh_tokens == (4 + 32) + (3 + 32)
    assert a.gen < 32 and b.gen < 32 and sum(q.keys for q in report.refreshed) < report.refresh_tokens
    assert [r.refresh_tokens for r in reports if not r.refreshed] == [0] * (len(reports) - 1)
