"""The engine sampler's index math on CPU with real tensors (vllm_odb/engine/sampler.py): the rows
of a refresh forward that ALP reads and the branch rows a jump-share step decides from must be the
ones the reference loop uses. The model is a stand-in whose hidden states are the logits."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm_odb.engine.branches import plan_jump  # noqa: E402
from vllm_odb.engine.requests import RequestTable  # noqa: E402
from vllm_odb.engine.sampler import ODBSampler  # noqa: E402
from vllm_odb.policies import DecodeConfig, decide  # noqa: E402
from vllm_odb.policies.confidence import drop_token, predict  # noqa: E402
from vllm_odb.policies.jump import accept  # noqa: E402
from vllm_odb.policies.length import predict_length  # noqa: E402

MASK, EOS, VOCAB = 9, 8, 12


def _sampler(shift: int, cfg: DecodeConfig):
    table = RequestTable(2, 512, cfg, shift, mask_id=MASK, eos_id=EOS, markers=[(EOS,)], device="cpu")
    model = types.SimpleNamespace(compute_logits=lambda h: h)  # hidden states are the logits
    state = types.SimpleNamespace(table=table, model=model, max_num_reqs=2, max_num_tokens=4096, device="cpu")
    base = types.SimpleNamespace(sampling_states=None,
                                 req_states=types.SimpleNamespace(draft_tokens=torch.zeros(2, table.width, dtype=torch.long)))
    return ODBSampler(state, base), table


def _params(**extra):
    return types.SimpleNamespace(temperature=0.0, max_tokens=None, extra_args=extra or None)


@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("eos_at", [5, 40, None])
def test_alp_reads_the_reference_rows(shift, eos_at):
    cfg = DecodeConfig(gen_length=64, block_length=16, alp=True, early_stop=True)
    sampler, table = _sampler(shift, cfg)
    prompt = list(range(1, 6))
    req = table.add(0, "a", prompt, prompt + [3] * 16, _params())  # block 0 committed: ALP at block 1
    assert (req.prompt_len, req.start, req.gen) == (5, 21, 64)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(req.end, VOCAB, generator=g)
    if eos_at is not None:  # canvas position eos_at is confidently EOS: its row is position - shift
        logits[req.prompt_len + eos_at - shift, EOS] = 30.0
    offset = 7  # the job's first row in the refresh batch
    hidden = torch.cat([torch.zeros(offset, VOCAB), logits])
    sampler._predict_lengths(hidden, [offset], [(0, 0)], [req])
    # The reference loop (reference/generate.py, refresh step with alp): rows s - shift .. end - shift.
    s = 21
    x0, conf = predict(drop_token(logits[s - shift: req.end - shift], MASK))
    scan = table.tokens[0, s:req.end] == MASK
    want = predict_length(x0[None], conf[None], scan[None], s - 5, torch.tensor([64]), [(EOS,)], cfg.alp_threshold,
                          16, cfg.alp_min_length)
    assert req.gen == int(want[0]) == (64 if eos_at in (None, 5) else 48)  # 5 is in the committed block
    assert req.stats["canvas_predicted"] == req.gen


@pytest.mark.parametrize("shift", [0, 1])
def test_jump_step_decides_each_branch_from_its_rows(shift):
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, threshold=0.8, ridge_rows=64)
    sampler, table = _sampler(shift, cfg)
    prompt = [1, 2, 3, 4]
    req = table.add(0, "a", prompt, None, _params())
    g = torch.Generator().manual_seed(1)
    block = torch.full((8,), MASK)
    block[2] = 5
    x0, conf = torch.randint(0, 8, (8,), generator=g), torch.rand(8, generator=g)
    req.plan = plan_jump(block, table.tokens[0, 4 - shift:4], x0, conf, MASK, req.cfg, 1, shift, table.width)
    assert req.plan is not None
    first = 3
    logits = torch.randn(first + table.width, VOCAB, generator=g)
    masked = block == MASK
    new, ax0, aconf, took = sampler._jump_decide(logits, first, req, masked)
    # The reference loop (reference/generate.py::_jump_step): branch logits through pred_row.
    plan = req.plan
    nb = plan.blocks.shape[0]
    lg = logits[first + plan.pred_row.reshape(-1)].view(nb, 8, VOCAB)
    bx0, bconf, bcommit = decide(lg, (plan.blocks == MASK) & masked.any(), cfg, MASK)
    c = int(accept(bcommit[None], bx0[None], plan.positions[None], plan.drafted[None], plan.family,
                   torch.ones(1, plan.family.shape[0], dtype=torch.bool))[0])
    assert torch.equal(new, torch.where(bcommit[c], bx0[c], plan.blocks[c]))
    assert torch.equal(ax0, bx0[c]) and torch.equal(aconf, bconf[c])
    assert int(took) == (0 if c == 0 else int(plan.family[c - 1].sum()))


def test_drafts_written_for_the_next_step_are_the_plan_rows():
    cfg = DecodeConfig(gen_length=32, block_length=8, jump=True, ridge_rows=64)
    sampler, table = _sampler(1, cfg)
    req = table.add(1, "a", [1, 2, 3, 4], None, _params())
    block = torch.full((8,), MASK)
    req.plan = plan_jump(block, table.tokens[1, 3:4], torch.arange(8), torch.linspace(1, 0, 8), MASK, req.cfg, 1, 1,
                         table.width)
    sampler._write_drafts([1])
    rows = sampler.req_states.draft_tokens[1]
    assert torch.equal(rows[: req.plan.num_rows], req.plan.tokens)
    assert rows[0] == 4 and (rows[1:9] == MASK).all()  # the base window: the token before, the block


@pytest.mark.parametrize("early_stop", [False, True])
def test_block_emitting_an_end_marker_counts_the_request_at_once(early_stop):
    """vLLM stops a request on the block that emits its EOS; its stats must reach the metrics in
    that step, not when vLLM's removal reaches the worker (maybe never, on an idle engine)."""
    import numpy as np

    cfg = DecodeConfig(gen_length=32, block_length=8, early_stop=early_stop)
    sampler, table = _sampler(0, cfg)
    req = table.add(0, "a", [1, 2, 3, 4], None, _params())
    logits = torch.full((8, VOCAB), -10.0)
    logits[:, 3] = 10.0
    logits[2, 3], logits[2, EOS] = -10.0, 10.0  # every position confident, one of them EOS
    batch = types.SimpleNamespace(idx_mapping_np=np.array([0]), cu_num_logits_np=np.array([0, 8]))
    sampled = torch.zeros(1, table.width, dtype=torch.long)
    num_sampled = torch.zeros(1, dtype=torch.int32)
    refresh_jobs = []
    emitted = sampler._decode(logits, batch, [0], sampled, num_sampled, refresh_jobs)
    assert emitted and int(num_sampled[0]) == 8 and sampled[0, 2] == EOS
    assert req.counted and req.finished == early_stop
    assert table.counters.totals["requests"] == 1 and table.counters.totals["forwards"] == 1
    table.remove("a")
    assert table.counters.totals["requests"] == 1  # counted once


def test_replay_forces_the_recorded_commits_and_end():
    """Benchmarks' trace replay on the engine: the recorded count commits (the most confident
    masked positions), the request ends after the trace's last block, whatever the model says."""
    import numpy as np

    cfg = DecodeConfig(gen_length=32, block_length=8)
    sampler, table = _sampler(0, cfg)
    trace = {"commits": [[1, 3, 4]], "lengths": [32]}
    req = table.add(0, "a", [1, 2, 3, 4], None, _params(replay=trace))
    assert req.replay is not None and req.replay.blocks == 1
    req.block_step = 1  # the refresh took the first recorded step
    table.tokens[0, 4] = 3  # ... and committed one token
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, VOCAB, generator=g)
    logits[:, EOS] = -30.0  # no end marker from the model
    logits[:, 5] = 30.0  # every position over the threshold: the rule would commit all 7
    batch = types.SimpleNamespace(idx_mapping_np=np.array([0]), cu_num_logits_np=np.array([0, 8]))
    sampled = torch.zeros(1, table.width, dtype=torch.long)
    num_sampled = torch.zeros(1, dtype=torch.int32)
    assert not sampler._decode(logits, batch, [0], sampled, num_sampled, [])
    assert int((table.tokens[0, 4:12] == MASK).sum()) == 4  # 7 masked - 3 recorded
    assert sampler._decode(logits, batch, [0], sampled, num_sampled, [])  # 4 more: the block is done
    assert req.finished  # the trace's last block, though the model predicted no EOS


def test_replay_arg_is_validated():
    from vllm_odb.engine.knobs import request_config

    with pytest.raises(ValueError, match="extra_args: replay"):
        request_config(DecodeConfig(gen_length=32, block_length=8), {"replay": {"commits": [[0]], "lengths": [8]}})


def test_a_window_the_scheduler_cut_short_decides_nothing():
    """The scheduler may give a running request fewer canvas slots than the window (token budget,
    max_model_len). That row's logits are not a block: it must commit nothing and reject every
    slot it got (vLLM's computed count stays put), and never read another row's logits."""
    import numpy as np

    cfg = DecodeConfig(gen_length=32, block_length=8)
    sampler, table = _sampler(0, cfg)
    a = table.add(0, "a", [1, 2, 3, 4], None, _params())
    b = table.add(1, "b", [1, 2, 3], None, _params())
    before = table.tokens[1].clone()
    logits = torch.zeros(8 + 5, VOCAB)
    logits[:3, 3] = 10.0  # a: three confident positions; the rest (and all of b's rows) are not
    batch = types.SimpleNamespace(
        num_reqs=2, idx_mapping_np=np.array([0, 1]), num_draft_tokens=13, cu_num_logits_np=np.array([0, 8, 13]),
        is_prefilling_np=np.array([False, False]), num_scheduled_tokens=np.array([8, 5]),
        num_computed_prefill_tokens_np=np.array([4, 3]), prefill_len_np=np.array([4, 3]))
    out = sampler(logits, batch)
    assert out.num_sampled.tolist() == [0, 0]
    assert out.num_rejected.tolist() == [8, 5]
    assert a.stats["forwards"] == 1 and (table.tokens[0, 4:7] == 3).all() and (table.tokens[0, 7:12] == MASK).all()
    assert b.start == 3 and torch.equal(table.tokens[1], before) and b.stats["forwards"] == 0


def _confident(rows: int, conf_by_row: list[float], token: int = 3) -> torch.Tensor:
    """Logits whose top-1 (``token``) probability at row i is conf_by_row[i] (the rest spread
    evenly over the other non-mask ids)."""
    import math

    logits = torch.zeros(rows, VOCAB)
    for i, c in enumerate(conf_by_row):
        rest = (1 - c) / (VOCAB - 2)  # the mask id is dropped before the softmax
        logits[i] = math.log(rest)
        logits[i, token] = math.log(c)
    return logits


def test_dynamic_threshold_on_the_engine_is_the_reference_policy():
    """Streaming-dLLM's tau = threshold * (1 - alpha * (1 - r_mask)) over the block and the canvas
    after it: the engine commits what policies.adaptive decides for the same tokens, which here
    is more than the fixed threshold would."""
    import numpy as np

    from vllm_odb.policies.adaptive import streaming_threshold

    cfg = DecodeConfig(gen_length=32, block_length=8, threshold=0.9, threshold_alpha=0.5)
    sampler, table = _sampler(0, cfg)
    req = table.add(0, "a", [1, 2, 3, 4], None, _params())
    table.tokens[0, 4:7] = 5  # three block positions decoded: r_mask = 29 / 32
    logits = _confident(8, [0.5] * 3 + [0.87, 0.8, 0.88, 0.5, 0.86])
    masked = (table.tokens[0, 4:12] == MASK)[None]
    tau = streaming_threshold(cfg, table.tokens[0, 4:36][None], torch.ones(1, 32, dtype=torch.bool), MASK)
    assert 0.85 < float(tau[0]) < 0.87
    _, _, want = decide(logits[None], masked, cfg, MASK, threshold=tau)
    _, _, fixed = decide(logits[None], masked, cfg, MASK)
    assert int(want.sum()) == 3 and int(fixed.sum()) == 1  # the dynamic threshold lets 0.86-0.88 in
    batch = types.SimpleNamespace(idx_mapping_np=np.array([0]), cu_num_logits_np=np.array([0, 8]))
    before = table.tokens[0, 4:12].clone()
    sampler._decode(logits, batch, [0], torch.zeros(1, table.width, dtype=torch.long),
                    torch.zeros(1, dtype=torch.int32), [])
    assert torch.equal(table.tokens[0, 4:12] != before, want[0])
    assert req.stats["forwards"] == 1


def test_apd_on_the_engine_carries_the_reference_state_across_steps():
    """Dynamic-dLLM's APD: per-position thresholds updated at every forward of a block from this
    and the previous forward's distributions (policies.adaptive.BlockThresholds, which the
    engine keeps on the request and resets at each refresh). Two engine steps commit what the
    reference policy decides over the same logits."""
    import numpy as np

    from vllm_odb.policies.adaptive import BlockThresholds

    cfg = DecodeConfig(gen_length=32, block_length=8, rule="adaptive", threshold=0.9, apd_alpha=0.1, apd_beta=0.05)
    sampler, table = _sampler(0, cfg)
    req = table.add(0, "a", [1, 2, 3, 4], None, _params())
    req.thresholds = BlockThresholds(cfg, MASK)  # what the block's refresh step sets up
    ref = BlockThresholds(cfg, MASK)
    batch = types.SimpleNamespace(idx_mapping_np=np.array([0]), cu_num_logits_np=np.array([0, 8]))
    x = table.tokens[0, :36].clone()
    committed = []
    for conf in ([0.95] + [0.3] * 7, [0.3, 0.85, 0.84, 0.83, 0.3, 0.3, 0.3, 0.3]):
        logits = _confident(8, conf)
        masked = (x[4:12] == MASK)[None]
        thr = ref.step(logits[None], x[None, 4:], torch.ones(1, 32, dtype=torch.bool))
        x0, _, commit = decide(logits[None], masked, cfg, MASK, threshold=thr)
        x[4:12] = torch.where(commit[0], x0[0], x[4:12])
        sampler._decode(logits, batch, [0], torch.zeros(1, table.width, dtype=torch.long),
                        torch.zeros(1, dtype=torch.int32), [])
        assert torch.equal(table.tokens[0, :36], x)
        committed.append(int(commit.sum()))
    assert committed == [1, 3]  # the second step's bar fell below 0.9 (APD), not the fixed rule's 1


def test_token_chunks_stay_within_the_budget():
    from vllm_odb.engine.sampler import token_chunks

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
        sampler, table = _sampler(shift, cfg)
        sampler.refresh_budget = budget
        sizes = []

        def forward(ids, pos, attend, sizes=sizes):
            sizes.append(len(ids))
            logits = torch.zeros(len(ids), VOCAB)
            logits[torch.arange(len(ids)), (ids * 7 + pos) % 8] = 5.0 + (pos % 3).float()  # confident at some
            return logits

        sampler.state.model.model = types.SimpleNamespace(refresh_forward=forward)
        sampler.state.block_tables = torch.arange(40).view(2, 20)
        sampler.state.kernel_block_size = 4
        reqs = [table.add(i, f"r{i}", list(range(1, 4 + i)), None, _params()) for i in range(2)]
        sampler._refresh([(0, 0), (1, 1)])
        assert max(sizes) <= budget or len(sizes) == 2
        outcomes.append((len(sizes), table.tokens.clone(), [q.stats["forwards"] for q in reqs]))
    (n_one, tok_one, fw_one), (n_cut, tok_cut, fw_cut) = outcomes
    assert (n_one, n_cut) == (1, 2)
    assert torch.equal(tok_one, tok_cut) and fw_one == fw_cut == [1, 1]
    assert (tok_one != MASK).sum() > 7  # something was committed


@pytest.mark.parametrize("start,gen,window", [(5, 64, 16), (5, 64, 60), (37, 64, 16), (53, 64, 16), (21, 48, 8)])
def test_suffix_pruning_keeps_the_reference_positions(start, gen, window):
    """Streaming-dLLM's pruned canvas on the engine (``ODBRequest.kept``) is the reference's
    (policies.streaming.pruned_suffix): the block, the window and the final position."""
    from vllm_odb.policies.streaming import pruned_suffix

    cfg = DecodeConfig(gen_length=gen, block_length=16, suffix_window=window)
    sampler, table = _sampler(0, cfg)
    plen = 5
    committed = list(range(1, plen + 1)) + [3] * (start - plen)
    q = table.add(0, "a", list(range(1, plen + 1)), committed, _params())
    assert q.start == start
    pos, valid = pruned_suffix(torch.tensor([plen]), start - plen, start - plen + 16, torch.tensor([gen]), window)
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
    sampler, table = _sampler(shift, cfg)
    seen = {}

    def forward(ids, pos, attend):
        seen.update(ids=ids.clone(), pos=pos.clone(), slots=attend.slots.clone(), bounds=list(attend.bounds))
        return torch.zeros(len(ids), VOCAB)

    sampler.state.model.model = types.SimpleNamespace(refresh_forward=forward)
    sampler.state.block_tables = torch.arange(40).flip(0).view(2, 20)  # a scrambled block table
    sampler.state.kernel_block_size = 4
    q = table.add(0, "a", [1, 2, 3, 4, 5], None, _params())
    sampler._refresh([(0, 0)])
    stop = 5 + 16 + 8
    assert seen["pos"].tolist() == list(range(stop)) + [5 + 64 - 1]
    assert seen["ids"][-1] == MASK and seen["bounds"] == [(0, stop + 1)]
    bt = sampler.state.block_tables[0]
    assert seen["slots"].tolist() == [int(bt[p // 4]) * 4 + p % 4 for p in range(stop + 1)]
    assert q.keys == stop + 1 and q.stats["refresh_tokens"] == stop + 1


def test_dynamic_threshold_under_pruning_counts_the_seen_suffix():
    """With suffix pruning the dynamic threshold's masked ratio is over the block and the suffix
    the step sees (window + final position), as in the reference loop's pruned sequence."""
    from vllm_odb.policies.adaptive import streaming_threshold

    cfg = DecodeConfig(gen_length=64, block_length=16, suffix_window=8, threshold_alpha=0.5)
    sampler, table = _sampler(0, cfg)
    q = table.add(0, "a", [1, 2, 3, 4, 5], None, _params())
    table.tokens[0, 5:15] = 3  # 10 of the block's 16 decoded
    got = sampler._thresholds([q], torch.tensor([0]), torch.zeros(1, 16, VOCAB))
    seen = torch.cat([table.tokens[0, 5:21], table.tokens[0, q.suffix_cols()]])[None]  # 16 + 8 + 1
    want = streaming_threshold(cfg, seen, torch.ones_like(seen, dtype=torch.bool), MASK)
    assert torch.allclose(got, want)
    whole = streaming_threshold(cfg, table.tokens[0, 5:69][None], torch.ones(1, 64, dtype=torch.bool), MASK)
    assert not torch.allclose(got, whole)  # pruning changes the ratio


def test_refresh_chunk_size_is_the_runners_token_budget_unless_overridden(monkeypatch):
    cfg = DecodeConfig(gen_length=32, block_length=8)
    monkeypatch.delenv("VLLM_ODB_REFRESH_TOKENS", raising=False)
    assert _sampler(0, cfg)[0].refresh_budget == 4096  # the state's max_num_tokens
    monkeypatch.setenv("VLLM_ODB_REFRESH_TOKENS", "123")
    assert _sampler(0, cfg)[0].refresh_budget == 123
