"""CPU tests for the ODB-dLLM decoding rules: adaptive length prediction (ALP), early stop,
the jump-share draft budget / family / layout / chain acceptance, and the ODB config knobs.

Every rule is exercised on hand-built, batched tensors whose rows sit in different situations,
so a rule that leaks across rows, or drops one of its conditions, changes an expected value.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from vllm_odb.policies import METHODS, DecodeConfig
from vllm_odb.policies.jump import (
    DraftBudget,
    accept,
    branch_blocks,
    branch_layout,
    build_drafts,
    draft_family,
    plan_drafts,
)
from vllm_odb.policies.length import marker_hits, predict_length, row_marker_hits
from vllm_odb.policies.step import block_ends


def L(values):
    return torch.tensor(values, dtype=torch.long)


def Bo(values):
    return torch.tensor(values, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# ALP: predict_length
# --------------------------------------------------------------------------------------------

EOS = 9
STOP_A, STOP_B = 7, 8  # a two-token stop marker (STOP_A, STOP_B)
MARKERS = [(EOS,), (STOP_A, STOP_B)]
FILLER = 1
HI, LO = 0.95, 0.5
THETA = 0.9


def alp_rows(n, rows):
    """rows: list of dicts {col: (token, conf)} (+ optional 'noscan': cols). Returns x0, conf, scan
    [B, n]; unlisted columns hold FILLER with high confidence and are scannable."""
    b = len(rows)
    x0 = torch.full((b, n), FILLER, dtype=torch.long)
    conf = torch.full((b, n), HI, dtype=torch.float32)
    scan = torch.ones((b, n), dtype=torch.bool)
    for r, spec in enumerate(rows):
        for col, val in spec.items():
            if col == "noscan":
                scan[r, list(val)] = False
                continue
            x0[r, col], conf[r, col] = val
    return x0, conf, scan


def test_predict_length_core_cases_batched():
    n = 16
    rows = [
        {5: (EOS, HI)},                                   # 0: hit at 5 -> cut after block [4, 8) -> 8
        {2: (EOS, LO), 9: (EOS, HI)},                     # 1: low-confidence hit ignored, 9 -> 12
        {1: (EOS, HI), 10: (EOS, HI), "noscan": [0, 1]},  # 2: hit at a committed position ignored
        {},                                               # 3: no hit -> unchanged
        {3: (EOS, LO), 14: (EOS, LO)},                    # 4: only low-confidence hits -> unchanged
        {0: (EOS, HI)},                                   # 5: hit at the very first position -> 4
        {8: (EOS, HI)},                                   # 6: hit at a block start -> 12
        {7: (EOS, HI)},                                   # 7: hit at a block end -> 8
        {13: (EOS, HI), 11: (EOS, HI), "noscan": [12, 13, 14, 15]},  # 8: outside canvas ignored
    ]
    x0, conf, scan = alp_rows(n, rows)
    length = L([16, 16, 16, 16, 16, 16, 16, 16, 12])
    out = predict_length(x0, conf, scan, 0, length, MARKERS, THETA, block_length=4)
    assert out.tolist() == [8, 12, 12, 16, 16, 4, 12, 8, 12]
    assert out.dtype == torch.long or out.dtype == length.dtype


def test_predict_length_threshold_is_inclusive():
    n = 8
    x0, conf, scan = alp_rows(n, [{2: (EOS, 0.75)}, {2: (EOS, 0.74)}])
    out = predict_length(x0, conf, scan, 0, L([8, 8]), MARKERS, 0.75, block_length=4)
    assert out.tolist() == [4, 8]


def test_predict_length_multi_token_markers():
    n = 16
    rows = [
        {2: (STOP_A, HI), 3: (STOP_B, HI)},               # 0: full confident sequence at 2 -> 4
        {2: (STOP_A, HI), 3: (STOP_B, LO)},               # 1: second token below theta -> none
        {2: (STOP_A, LO), 3: (STOP_B, HI)},               # 2: first token below theta -> none
        {15: (STOP_A, HI)},                               # 3: partial sequence at the row end -> none
        {4: (STOP_A, HI), 6: (STOP_B, HI)},               # 4: tokens not adjacent -> none
        {5: (STOP_B, HI), 6: (STOP_A, HI)},               # 5: wrong order -> none
        {9: (STOP_A, HI), 10: (STOP_B, HI), "noscan": [10]},  # 6: second token not scannable -> none
        {3: (STOP_A, HI), 4: (STOP_B, HI)},               # 7: sequence straddles blocks; starts in block 0 -> 4
        {2: (STOP_A, HI), 3: (STOP_B, LO), 12: (STOP_A, HI), 13: (STOP_B, HI)},  # 8: later full one -> 16
    ]
    x0, conf, scan = alp_rows(n, rows)
    out = predict_length(x0, conf, scan, 0, torch.full((len(rows),), 16, dtype=torch.long), MARKERS,
                         THETA, block_length=4)
    assert out.tolist() == [4, 16, 16, 16, 16, 16, 16, 4, 16]


def test_predict_length_earliest_marker_wins_regardless_of_marker_order():
    n = 16
    rows = [
        {10: (EOS, HI), 5: (STOP_A, HI), 6: (STOP_B, HI)},   # multi-token first -> 8
        {1: (EOS, HI), 9: (STOP_A, HI), 10: (STOP_B, HI)},   # single first -> 4
        {14: (EOS, HI), 6: (EOS, HI), 11: (EOS, HI)},        # several of one kind -> 8
    ]
    x0, conf, scan = alp_rows(n, rows)
    length = torch.full((3,), 16, dtype=torch.long)
    for markers in (MARKERS, MARKERS[::-1]):
        out = predict_length(x0, conf, scan, 0, length, markers, THETA, block_length=4)
        assert out.tolist() == [8, 4, 8]


def test_predict_length_min_length_guard():
    n = 16
    rows = [
        {3: (EOS, HI)},                 # only a hit before min_length -> unchanged
        {3: (EOS, HI), 9: (EOS, HI)},   # early hit ignored, later one counts -> 12
        {6: (EOS, HI)},                 # hit exactly at min_length counts -> 8
        {5: (EOS, HI), 6: (STOP_A, HI), 7: (STOP_B, HI)},  # multi-token start at 6 counts -> 8
    ]
    x0, conf, scan = alp_rows(n, rows)
    length = torch.full((4,), 16, dtype=torch.long)
    out = predict_length(x0, conf, scan, 0, length, MARKERS, THETA, block_length=4, min_length=6)
    assert out.tolist() == [16, 12, 8, 8]
    # Without the guard the early hits cut.
    out0 = predict_length(x0, conf, scan, 0, length, MARKERS, THETA, block_length=4)
    assert out0.tolist() == [4, 4, 8, 8]


def test_predict_length_offset_shifts_canvas_positions():
    # Current block is block 2 (block_length 4): columns cover canvas positions 8 .. 19.
    n = 12
    rows = [
        {5: (EOS, HI)},                 # canvas 13 -> 16
        {1: (EOS, HI)},                 # canvas 9 -> 12
        {1: (EOS, HI), 3: (EOS, HI)},   # with min_length 10: canvas 9 ignored, canvas 11 -> 12
        {},                             # no hit -> unchanged
    ]
    x0, conf, scan = alp_rows(n, rows)
    length = torch.full((4,), 20, dtype=torch.long)
    out = predict_length(x0, conf, scan, 8, length, MARKERS, THETA, block_length=4)
    assert out.tolist() == [16, 12, 12, 20]
    out = predict_length(x0, conf, scan, 8, length, MARKERS, THETA, block_length=4, min_length=10)
    # row 1: canvas 9 < 10 ignored -> unchanged; row 2: canvas 11 -> 12.
    assert out.tolist() == [16, 20, 12, 20]


def test_predict_length_never_grows():
    n = 16
    rows = [
        {13: (EOS, HI)},   # cut would be 16 but the canvas is already 12 -> stays 12
        {13: (EOS, HI)},   # length 16 -> 16
        {2: (EOS, HI)},    # length 8 -> 4 (shrinks)
        {},                # no hit, length 8 -> 8
    ]
    x0, conf, scan = alp_rows(n, rows)
    length = L([12, 16, 8, 8])
    out = predict_length(x0, conf, scan, 0, length, MARKERS, THETA, block_length=4)
    assert out.tolist() == [12, 16, 4, 8]
    assert bool((out <= length).all())


def test_predict_length_rows_independent():
    n = 16
    rows = [{5: (EOS, HI)}, {}, {11: (STOP_A, HI), 12: (STOP_B, HI)}, {2: (EOS, LO)}]
    x0, conf, scan = alp_rows(n, rows)
    length = torch.full((4,), 16, dtype=torch.long)
    full = predict_length(x0, conf, scan, 0, length, MARKERS, THETA, block_length=4)
    for r in range(4):
        single = predict_length(x0[r:r + 1], conf[r:r + 1], scan[r:r + 1], 0, length[r:r + 1], MARKERS,
                                THETA, block_length=4)
        assert single.tolist() == [full[r].item()]
    assert full.tolist() == [8, 16, 12, 16]
    # Permuting rows permutes the answers.
    perm = [2, 0, 3, 1]
    outp = predict_length(x0[perm], conf[perm], scan[perm], 0, length[perm], MARKERS, THETA, block_length=4)
    assert outp.tolist() == [full[i].item() for i in perm]


def test_marker_hits_start_columns():
    tokens = L([[1, 7, 8, 9, 7], [9, 9, 1, 7, 8]])
    hits = marker_hits(tokens, MARKERS)
    assert hits.tolist() == [[False, True, False, True, False], [True, True, False, True, False]]
    # A marker longer than the row never matches.
    assert not marker_hits(L([[7]]), [(7, 8)]).any()


# --------------------------------------------------------------------------------------------
# Early termination: block_ends
# --------------------------------------------------------------------------------------------

def test_block_ends():
    block = L([
        [1, 9, 1, 1],   # single marker -> True
        [1, 1, 1, 1],   # no marker -> False
        [1, 7, 8, 1],   # full multi-token marker -> True
        [1, 1, 1, 7],   # partial multi-token at the end -> False
        [7, 1, 8, 1],   # multi-token tokens not adjacent -> False
        [8, 7, 1, 1],   # multi-token in wrong order -> False
        [1, 1, 1, 9],   # single marker at the last position -> True
    ])
    out = block_ends(block, [tuple(MARKERS)] * 7)
    assert out.tolist() == [True, False, True, False, False, False, True]
    # No confidence condition at block end.
    assert out.dtype == torch.bool
    # A trace may force the answer (1: ends, 0: goes on; -1: the markers decide).
    forced = torch.tensor([0, 1, -1, -1, -1, -1, 0])
    assert block_ends(block, [tuple(MARKERS)] * 7, forced).tolist() == [False, True, True, False, False, False, False]
    # Columns outside the canvas (``valid``) never hold a marker.
    valid = torch.ones_like(block, dtype=torch.bool)
    valid[:, 1] = False
    assert block_ends(block, [tuple(MARKERS)] * 7, valid=valid).tolist() == [False] * 6 + [True]


def test_each_row_has_its_own_markers():
    """Requests carry their own stop strings: a row matches only its own markers."""
    tokens = L([[1, 7, 8, 1], [1, 7, 8, 1], [1, 5, 1, 1], [1, 5, 1, 1]])
    markers = [((9,), (7, 8)), ((9,),), ((9,), (5,)), ((9,),)]
    assert row_marker_hits(tokens, markers).tolist() == [True, False, True, False]
    assert row_marker_hits(tokens, [((9,),)] * 4).tolist() == [False] * 4  # shared: one pass
    assert row_marker_hits(tokens, [()] * 4).tolist() == [False] * 4


# --------------------------------------------------------------------------------------------
# Draft budget: plan_drafts
# --------------------------------------------------------------------------------------------

def _random_blocks(gen, b: int, k: int, shift: int, mask: int, vocab: int):
    """``b`` blocks of ``k`` with a random share masked, the ``shift`` tokens before each, and
    predictions (x0, conf) over them: a jump-share plan's inputs."""
    block = torch.randint(0, vocab, (b, k), generator=gen)
    masked = torch.rand(b, k, generator=gen) < torch.rand(b, 1, generator=gen)
    block[masked] = mask
    before = torch.randint(0, vocab, (b, shift), generator=gen)
    return block, before, torch.randint(0, vocab, (b, k), generator=gen), torch.rand(b, k, generator=gen)


def plan(ridge, n_req, window, masked, max_positions=8):
    p, shared = plan_drafts(DraftBudget(ridge_rows=ridge, max_positions=max_positions), n_req, window, L(masked))
    return p.tolist(), shared.tolist()


def test_plan_drafts_a100_like_ridge_batch1():
    # ridge 158, block 32: m=32 -> 2 full drafts positions (phase A: 3 drafts, 4*32 = 128 rows);
    # m=18 -> 4 shared (phase B: 32 + 7*18 = 158 rows); m=20 -> 3 shared (32 + 5*20 = 132; p=4 is 172).
    # (num_requests=1: each call plans one request.)
    assert plan(158, 1, 32, [32]) == ([2], [False])
    assert plan(158, 1, 32, [18]) == ([4], [True])
    assert plan(158, 1, 32, [20]) == ([3], [True])
    assert plan(158, 1, 32, [19]) == ([3], [True])   # 32 + 7*19 = 165 > 158
    assert plan(158, 1, 32, [25]) == ([3], [True])   # 32 + 5*25 = 157 <= 158 (full gives only 2)
    assert plan(158, 1, 32, [31]) == ([2], [False])  # shared 32 + 3*31 = 125 -> 2, not more than full 2


def test_plan_drafts_hand_arithmetic_vectorized():
    # Same share for every row (num_requests fixed); masked counts differ per row.
    # ridge 158, one request's share = 158 (num_requests 1), window 32:
    p, shared = plan(158, 1, 32, [32, 18, 20, 25, 31, 5, 2, 1, 0])
    # m=25: room 126 // 25 = 5 -> (5 + 1)//2 = 3 shared (32 + 5*25 = 157 <= 158).
    # m=31: 126 // 31 = 4 -> 2 shared == full 2 -> full.
    # m=5: 126 // 5 = 25 -> 13, capped by m-1 = 4 -> shared 4 (full 2).
    # m=2: cap 1 -> full p_full = min(2, 1) = 1, shared 1 -> not strictly more -> full.
    # m=1, m=0: nothing left to draft.
    assert p == [2, 4, 3, 3, 2, 4, 1, 0, 0]
    assert shared == [False, True, True, True, False, True, False, False, False]


def test_plan_drafts_larger_ridge_and_batches():
    # ridge 256, batch 1, m=32: 2*4*32 = 256 rows full.
    assert plan(256, 1, 32, [32]) == ([4], [False])
    # batch 2 halves the share: ridge 316 with 2 requests == ridge 158 with 1.
    assert plan(316, 2, 32, [32, 18]) == ([2, 4], [False, True])
    assert plan(256, 2, 32, [32, 18]) == ([2, 3], [False, True])  # share 128: 32 + 5*18 = 122
    # ridge 256, batch 4: share 64 -> full p = 1 (64 rows); shared m=8: room 32 // 8 = 4 -> 2 (32+3*8=56).
    assert plan(256, 4, 32, [32, 8, 3, 1]) == ([1, 2, 2, 0], [False, True, True, False])
    # batch 64 (and above): share 4 < window -> no drafts at all.
    p, shared = plan(256, 64, 32, [32] * 32 + [5] * 32)
    assert p == [0] * 64 and shared == [False] * 64
    # Dream window (block 32 + 1): ridge 158, m=32 -> full 158 // 66 = 2; shared room 125 // 32 = 3 -> 2.
    assert plan(158, 1, 33, [32, 18]) == ([2, 3], [False, True])  # m=18: 125 // 18 = 6 -> 3


def test_plan_drafts_caps():
    # Huge budget: p limited by m - 1 and by max_positions.
    assert plan(100000, 1, 32, [32, 5, 3, 2, 1, 0]) == ([8, 4, 2, 1, 0, 0], [False, False, False, False, False, False])
    assert plan(100000, 1, 32, [32, 5], max_positions=3)[0] == [3, 3]
    assert plan(100000, 1, 32, [32], max_positions=0)[0] == [0]


@pytest.mark.parametrize("window", [4, 8, 32, 33])
def test_plan_drafts_is_the_largest_feasible(window):
    ms = list(range(0, 41))
    for ridge, n_req, maxp in itertools.product([1, 16, 64, 100, 158, 256, 512, 2048], [1, 2, 3, 8, 64], [0, 2, 8]):
        share = ridge // n_req
        p, shared = plan_drafts(DraftBudget(ridge, maxp), n_req, window, L(ms))
        for m, pi, si in zip(ms, p.tolist(), shared.tolist()):
            cap = max(0, min(m - 1, maxp))
            best_full = max(q for q in range(cap + 1) if 2 * q * window <= share)
            feas_shared = [q for q in range(1, cap + 1) if window + (2 * q - 1) * m <= share]
            best_shared = max(feas_shared, default=0)
            ctx = (ridge, n_req, window, maxp, m)
            assert pi == max(best_full, best_shared), ctx
            assert si == (best_shared > best_full), ctx
            assert pi <= max(0, m - 1) and pi <= maxp, ctx
            if si:
                assert window + (2 * pi - 1) * m <= share, ctx
            else:
                assert 2 * pi * window <= share, ctx


def test_draft_budget_validation():
    for bad in (0, -3, 1.5, "256"):
        with pytest.raises(ValueError, match="ridge_rows"):
            DraftBudget(ridge_rows=bad)
    with pytest.raises(ValueError, match="max_positions"):
        DraftBudget(max_positions=-1)


# --------------------------------------------------------------------------------------------
# Draft family, build_drafts, branch_blocks
# --------------------------------------------------------------------------------------------

def fam_sets(p):
    return [tuple(torch.nonzero(r).flatten().tolist()) for r in draft_family(p)]


def test_draft_family_layouts():
    assert fam_sets(1) == [(0,)]
    assert fam_sets(2) == [(0,), (1,), (0, 1)]  # paper phase A: B1 {t1}, B2 {t2}, B3 {t1, t2}
    assert fam_sets(3) == [(0,), (1,), (0, 1), (2,), (0, 1, 2)]
    # Paper phase B (binary-counter layout): {t1},{t2},{t1,t2},{t3},{t1,t2,t3},{t4},{t1..t4}
    assert fam_sets(4) == [(0,), (1,), (0, 1), (2,), (0, 1, 2), (3,), (0, 1, 2, 3)]
    for p in range(0, 9):
        fam = draft_family(p)
        assert fam.dtype == torch.bool
        assert tuple(fam.shape) == (max(0, 2 * p - 1), p)
        # Distinct drafts, every one non-empty.
        sets = [tuple(r.tolist()) for r in fam]
        assert len(set(sets)) == len(sets)
        assert all(any(s) for s in sets)


def test_build_drafts_top_p_masked_only():
    x0 = L([[10, 11, 12, 13, 14, 15],
            [20, 21, 22, 23, 24, 25],
            [30, 31, 32, 33, 34, 35]])
    conf = torch.tensor([[0.99, 0.30, 0.80, 0.10, 0.60, 0.98],   # 0 and 5 are the most confident but unmasked
                         [0.20, 0.90, 0.50, 0.95, 0.40, 0.70],
                         [0.50, 0.60, 0.70, 0.99, 0.10, 0.20]])
    masked = Bo([[False, True, True, True, True, False],
                 [True, True, True, True, True, True],
                 [True, False, True, False, True, True]])
    pos, tok = build_drafts(x0, conf, masked, 2)
    assert pos.tolist() == [[2, 4], [3, 1], [2, 0]]
    assert tok.tolist() == [[12, 14], [23, 21], [32, 30]]
    pos, tok = build_drafts(x0, conf, masked, 3)
    assert pos.tolist() == [[2, 4, 1], [3, 1, 5], [2, 0, 5]]
    assert tok.tolist() == [[12, 14, 11], [23, 21, 25], [32, 30, 35]]
    # Every returned position is masked when the row has at least p masked positions.
    assert bool(masked.gather(1, pos).all())


def test_branch_blocks_fill_only_in_including_drafts():
    M = 99
    block = L([[M, 5, M, M, 6],
               [M, M, 7, M, M]])
    positions = L([[3, 0], [4, 1]])
    tokens = L([[30, 10], [44, 11]])
    out = branch_blocks(block, positions, tokens, draft_family(2))
    assert out.shape == (2, 4, 5)
    assert out[0].tolist() == [
        [M, 5, M, M, 6],     # base unchanged
        [M, 5, M, 30, 6],    # {t1}
        [10, 5, M, M, 6],    # {t2}
        [10, 5, M, 30, 6],   # {t1, t2}
    ]
    assert out[1].tolist() == [
        [M, M, 7, M, M],
        [M, M, 7, M, 44],
        [M, 11, 7, M, M],
        [M, 11, 7, M, 44],
    ]
    # p = 4 family: each draft holds exactly its set.
    block4 = torch.full((1, 6), M, dtype=torch.long)
    pos4, tok4 = L([[5, 2, 0, 3]]), L([[50, 20, 1, 30]])
    out4 = branch_blocks(block4, pos4, tok4, draft_family(4))[0]
    assert out4[0].tolist() == [M] * 6
    assert out4[5].tolist() == [1, M, 20, M, M, 50]        # {t1, t2, t3}
    assert out4[6].tolist() == [M, M, M, 30, M, M]         # {t4}
    assert out4[7].tolist() == [1, M, 20, 30, M, 50]       # {t1..t4}
    assert block.tolist() == [[M, 5, M, M, 6], [M, M, 7, M, M]]  # input not modified


# --------------------------------------------------------------------------------------------
# branch_layout
# --------------------------------------------------------------------------------------------

def window_tokens(b, nb, w):
    """Distinct ids: 1000 * request + 100 * branch + offset."""
    return (1000 * torch.arange(b)[:, None, None] + 100 * torch.arange(nb)[None, :, None]
            + torch.arange(w)[None, None, :])


def grid(rows):
    """['1100', ...] -> bool tensor."""
    return torch.tensor([[c == "1" for c in r] for r in rows], dtype=torch.bool)


def check_real_rows(lay, r, expect_rows, b_index):
    """expect_rows: list of (branch, offset) for the real rows of request r, in order."""
    n = len(expect_rows)
    assert lay.num_rows[r].item() == n
    assert lay.branch[r, :n].tolist() == [br for br, _ in expect_rows]
    assert lay.offset[r, :n].tolist() == [off for _, off in expect_rows]
    assert lay.tokens[r, :n].tolist() == [1000 * b_index + 100 * br + off for br, off in expect_rows]
    q = lay.branch.shape[1]
    # Padding rows: branch -1, see nothing among new rows, and nobody sees them.
    assert lay.branch[r, n:].tolist() == [-1] * (q - n)
    assert not lay.attn[r, n:, :].any()
    assert not lay.attn[r, :, n:].any()


def test_branch_layout_full_layout():
    k, d = 3, 3
    win = window_tokens(2, 1 + d, k)
    valid = Bo([[True, True, True], [True, False, True]])
    shared = Bo([False, False])
    masked = Bo([[True, True, False], [True, False, True]])
    lay = branch_layout(win, valid, shared, masked, shift=0)
    assert lay.tokens.shape == (2, 12)
    # Request 0: 4 branches x 3 rows, block-diagonal.
    check_real_rows(lay, 0, [(br, o) for br in range(4) for o in range(3)], 0)
    blk = torch.block_diag(*[torch.ones(3, 3, dtype=torch.bool)] * 4)
    assert torch.equal(lay.attn[0], blk)
    assert lay.pred_row[0].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    # Request 1: draft 1 (branch 2) invalid -> no rows; others full and block-diagonal.
    check_real_rows(lay, 1, [(br, o) for br in (0, 1, 3) for o in range(3)], 1)
    blk9 = torch.block_diag(*[torch.ones(3, 3, dtype=torch.bool)] * 3)
    assert torch.equal(lay.attn[1, :9, :9], blk9)
    assert lay.pred_row[1, 0].tolist() == [0, 1, 2]
    assert lay.pred_row[1, 1].tolist() == [3, 4, 5]
    assert lay.pred_row[1, 3].tolist() == [6, 7, 8]


def shared_case():
    k, d = 4, 3
    win = window_tokens(3, 1 + d, k)
    valid = Bo([[True, True, True], [True, False, True], [True, True, True]])
    shared = Bo([True, True, False])
    masked = Bo([[False, True, False, True], [True, True, True, False], [True, True, True, True]])
    return branch_layout(win, valid, shared, masked, shift=0)


def test_branch_layout_shared_layout_rows_and_mask():
    lay = shared_case()
    assert lay.tokens.shape == (3, 16)
    assert lay.num_rows.tolist() == [10, 10, 16]
    # Request 0: masked {1, 3}: base 4 rows, each draft rows at offsets 1, 3 only.
    check_real_rows(lay, 0, [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 3), (2, 1), (2, 3), (3, 1), (3, 3)], 0)
    assert torch.equal(lay.attn[0, :10, :10], grid([
        "1111000000",
        "1111000000",
        "1111000000",
        "1111000000",
        "1010110000",   # draft rows: base at decoded offsets 0, 2 + own rows; not base masked 1, 3
        "1010110000",
        "1010001100",
        "1010001100",
        "1010000011",
        "1010000011",
    ]))
    # Request 1: masked {0, 1, 2}; draft 1 (branch 2) invalid.
    check_real_rows(lay, 1, [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (3, 0), (3, 1), (3, 2)], 1)
    assert torch.equal(lay.attn[1, :10, :10], grid([
        "1111000000",
        "1111000000",
        "1111000000",
        "1111000000",
        "0001111000",
        "0001111000",
        "0001111000",
        "0001000111",
        "0001000111",
        "0001000111",
    ]))
    # Request 2: full layout in the same batch.
    check_real_rows(lay, 2, [(br, o) for br in range(4) for o in range(4)], 2)
    assert torch.equal(lay.attn[2], torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 4))


def test_branch_layout_shared_pred_rows_at_masked_positions():
    lay = shared_case()
    # Each branch's prediction for a masked position comes from its own row; the base from base rows.
    assert lay.pred_row[0, 0].tolist() == [0, 1, 2, 3]
    assert [lay.pred_row[0, br, t].item() for br in (1, 2, 3) for t in (1, 3)] == [4, 5, 6, 7, 8, 9]
    assert lay.pred_row[1, 0].tolist() == [0, 1, 2, 3]
    assert lay.pred_row[1, 1, :3].tolist() == [4, 5, 6]
    assert lay.pred_row[1, 3, :3].tolist() == [7, 8, 9]
    assert lay.pred_row[2].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_branch_layout_pred_row_falls_back_to_base_when_padded():
    lay = shared_case()
    # Request 0 (10 real rows of 16): decoded offsets 0, 2 of every draft read the base rows.
    assert lay.pred_row[0].tolist() == [[0, 1, 2, 3], [0, 4, 2, 5], [0, 6, 2, 7], [0, 8, 2, 9]]
    # Request 1: draft 0 owns 0..2 and reads base at 3; invalid draft 1 maps to the base rows.
    assert lay.pred_row[1].tolist() == [[0, 1, 2, 3], [4, 5, 6, 3], [0, 1, 2, 3], [7, 8, 9, 3]]
    # Every prediction row is a real row of its request.
    for r in range(3):
        assert bool((lay.pred_row[r] < lay.num_rows[r]).all())


def test_branch_layout_dream_shift():
    # shift = 1: K = 3, W = 4; window offset o holds position o - 1 and predicts position o.
    k, d, shift = 3, 1, 1
    w = k + shift
    win = window_tokens(3, 1 + d, w)
    valid = Bo([[True], [True], [True]])
    shared = Bo([True, True, False])
    masked = Bo([[False, False, True],    # draft owns offsets 2 (row before) and 3 (the masked one)
                 [True, False, False],    # draft owns offsets 0 (before the block) and 1
                 [True, True, True]])
    lay = branch_layout(win, valid, shared, masked, shift=shift)
    assert lay.tokens.shape == (3, 8)
    assert lay.num_rows.tolist() == [6, 6, 8]
    check_real_rows(lay, 0, [(0, 0), (0, 1), (0, 2), (0, 3), (1, 2), (1, 3)], 0)
    assert torch.equal(lay.attn[0, :6, :6], grid([
        "111100", "111100", "111100", "111100",
        "110011", "110011",
    ]))
    check_real_rows(lay, 1, [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)], 1)
    assert torch.equal(lay.attn[1, :6, :6], grid([
        "111100", "111100", "111100", "111100",
        "001111", "001111",
    ]))
    check_real_rows(lay, 2, [(br, o) for br in range(2) for o in range(4)], 2)
    assert torch.equal(lay.attn[2], torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 2))
    # Prediction rows: position t from offset t.
    assert lay.pred_row[0, 0].tolist() == [0, 1, 2]
    assert lay.pred_row[0, 1, 2].item() == 4        # masked position 2 <- draft's row at offset 2
    assert lay.pred_row[1, 0].tolist() == [0, 1, 2]
    assert lay.pred_row[1, 1, :2].tolist() == [4, 5]  # masked position 0 <- draft's row at offset 0
    assert lay.pred_row[2].tolist() == [[0, 1, 2], [4, 5, 6]]


def test_branch_layout_shared_gap_and_all_masked_shift():
    # Shift 1, D = 3, masked {1} with a gap around it and a request with all masked: need offsets
    # {1, 2} for the first; all 4 for the second (shared then equals full in rows).
    k, d, shift = 3, 3, 1
    win = window_tokens(2, 1 + d, k + shift)
    valid = Bo([[True, True, True], [True, True, True]])
    shared = Bo([True, True])
    masked = Bo([[False, True, False], [True, True, True]])
    lay = branch_layout(win, valid, shared, masked, shift=shift)
    assert lay.num_rows.tolist() == [10, 16]
    check_real_rows(lay, 0, [(0, o) for o in range(4)] + [(br, o) for br in (1, 2, 3) for o in (1, 2)], 0)
    assert torch.equal(lay.attn[0, :10, :10], grid([
        "1111000000", "1111000000", "1111000000", "1111000000",
        "1001110000", "1001110000",
        "1001001100", "1001001100",
        "1001000011", "1001000011",
    ]))
    assert torch.equal(lay.attn[1], torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 4))
    assert [lay.pred_row[0, br, 1].item() for br in range(4)] == [1, 4, 6, 8]


# --------------------------------------------------------------------------------------------
# accept: the chain rule
# --------------------------------------------------------------------------------------------

OTHER = 0


def accept_case(k, positions, tokens, cases, valid=None):
    """cases[r]: list of (branch, i, token[, committed]) -- branch commits drafted position i
    (positions[i]) predicting ``token``; committed defaults to True. Returns accept()'s answer."""
    p = len(positions)
    fam = draft_family(p)
    d = fam.shape[0]
    b = len(cases)
    commit = torch.zeros((b, 1 + d, k), dtype=torch.bool)
    x0 = torch.full((b, 1 + d, k), OTHER, dtype=torch.long)
    for r, items in enumerate(cases):
        for item in items:
            br, i, tok = item[:3]
            committed = item[3] if len(item) > 3 else True
            commit[r, br, positions[i]] = committed
            x0[r, br, positions[i]] = tok
    pos = L([positions] * b)
    tok = L([tokens] * b)
    dv = torch.ones((b, d), dtype=torch.bool) if valid is None else Bo(valid)
    return accept(commit, x0, pos, tok, fam, dv).tolist()


def test_accept_phase_a():
    # p = 2, K = 4, t1 = 2 (d1 = 11), t2 = 0 (d2 = 22). Branches: 0 base, 1 {t1}, 2 {t2}, 3 {t1,t2}.
    d1, d2 = 11, 22
    cases = [
        [(0, 0, d1)],                          # a1 -> {t1}
        [(0, 1, d2)],                          # a2 -> {t2}
        [(0, 0, d1), (0, 1, d2)],              # a1 and a2 -> {t1, t2}
        [(0, 1, d2), (2, 0, d1)],              # a21 -> {t1, t2}
        [(0, 0, d1), (1, 1, d2)],              # a12 -> {t1, t2}
        [(0, 0, 33)],                          # t1 committed with a different token -> base
        [(0, 0, d1, False)],                   # right token, not in the transfer set -> base
        [],                                    # nothing -> base
        [(1, 1, d2), (2, 0, d1), (3, 0, d1)],  # drafts agree but the base verifies nothing -> base
        [(0, 1, d2), (2, 0, d1, False)],       # a2, {t2} predicts d1 but does not commit -> {t2}
        [(0, 0, d1), (1, 1, 44)],              # a1, {t1} commits t2 with wrong token -> {t1}
        [(0, 0, d2), (0, 1, d1)],              # swapped tokens -> base
    ]
    assert accept_case(4, [2, 0], [d1, d2], cases) == [1, 2, 3, 3, 3, 0, 0, 0, 0, 2, 1, 0]


def test_accept_phase_a_invalid_drafts():
    d1, d2 = 11, 22
    cases = [
        [(0, 0, d1), (0, 1, d2)],              # {t1,t2} invalid -> best valid single: {t1}
        [(0, 0, d1)],                          # {t1} invalid -> base
        [(0, 1, d2), (2, 0, d1)],              # a21 but {t2} invalid: chain through it broken -> base
        [(0, 0, d1), (0, 1, d2)],              # all valid -> {t1, t2}
    ]
    valid = [[True, True, False], [False, True, True], [True, False, True], [True, True, True]]
    assert accept_case(4, [2, 0], [d1, d2], cases, valid) == [1, 0, 0, 3]


# p = 4: branches 0 base, 1 {t1}, 2 {t2}, 3 {t1,t2}, 4 {t3}, 5 {t1,t2,t3}, 6 {t4}, 7 {t1..t4}.
P4_POS = [3, 0, 5, 1]
D1, D2, D3, D4 = 11, 22, 33, 44
P4_TOK = [D1, D2, D3, D4]


def test_accept_phase_b_chains():
    cases = [
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (0, 3, D4)],          # base commits all -> {t1..t4}
        [(0, 0, D1), (0, 1, D2), (3, 2, D3)],                       # {t1,t2} commits t3 -> {t1,t2,t3}
        [(0, 0, D1), (0, 1, D2), (0, 2, D3)],                       # a1 a2 a3 -> {t1,t2,t3}
        [(0, 2, D3), (4, 0, D1), (4, 1, D2)],                       # {t3} commits t1, t2 -> {t1,t2,t3}
        [(0, 3, D4), (6, 0, D1), (6, 1, D2), (6, 2, D3)],           # {t4} commits t1..t3 -> {t1..t4}
        [(0, 0, D1), (1, 1, D2), (3, 2, D3), (5, 3, D4)],           # 4-step chain -> {t1..t4}
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (5, 3, D4)],           # {t1,t2,t3} commits t4 -> {t1..t4}
        [(0, 2, D3)],                                               # a3 only -> {t3}
        [(0, 3, D4)],                                               # a4 only -> {t4}
        [(0, 0, D1), (0, 2, D3)],                                   # {t1} and {t3}: tie, family order -> {t1}
        [(0, 2, D3), (0, 3, D4)],                                   # {t3}, {t4} -> {t3}
        [(0, 0, D1), (0, 1, D2), (0, 3, D4)],                       # {t1,t2} (no {t1,t2,t4} state)
        [(0, 1, D2), (2, 0, D1), (3, 2, D3), (3, 3, D4)],           # {t2}->{t1,t2}->{t1..t4}
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (0, 3, 99)],           # wrong t4 token -> {t1,t2,t3}
        [(0, 0, D1), (0, 1, D2), (3, 2, D3, False)],                # t3 predicted, not committed -> {t1,t2}
        [],                                                         # nothing -> base
    ]
    assert accept_case(6, P4_POS, P4_TOK, cases) == [7, 5, 5, 5, 7, 7, 7, 4, 6, 1, 4, 3, 7, 5, 3, 0]


def test_accept_phase_b_no_index_slip():
    # The released code accepts {t1..t4} when a4, a12 and {t4} commits t3 with a token equal to
    # {t3}'s prediction at t1 (= d1 here). The chain rule only counts t3 verified with d3.
    slip = [(0, 0, D1), (0, 1, D2), (0, 3, D4), (6, 2, D1), (4, 0, D1)]
    good = [(0, 0, D1), (0, 1, D2), (0, 3, D4), (6, 0, D1), (6, 1, D2), (6, 2, D3)]
    # Also: {t4} commits t3 with d3 but not t1/t2 -> still {t1,t2} (the {t4} step must fill all of
    # {t1,t2,t3}; {t1,t2} itself never verified t3 or t4).
    partial = [(0, 0, D1), (0, 1, D2), (0, 3, D4), (6, 2, D3)]
    assert accept_case(6, P4_POS, P4_TOK, [slip, good, partial]) == [3, 7, 3]


def test_accept_phase_b_invalid_drafts_and_row_independence():
    cases = [
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (0, 3, D4)],   # {t1..t4} invalid -> {t1,t2,t3}
        [(0, 0, D1), (0, 1, D2), (3, 2, D3)],               # {t1,t2} invalid: no chain to {t1,t2,t3} -> {t1}
        [(0, 0, D1), (0, 1, D2), (0, 2, D3)],               # {t1,t2,t3} reachable directly from base
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (0, 3, D4)],   # only p_row = 2 drafts valid -> {t1,t2}
        [(0, 0, D1), (0, 1, D2), (0, 2, D3), (0, 3, D4)],   # all valid -> {t1..t4}
        # Chains only grow a state: from {t3}, committing t1, t2 leads to {t1,t2,t3} (invalid
        # here), never to {t1,t2}, which does not contain t3 -> stays {t3}.
        [(0, 2, D3), (4, 0, D1), (4, 1, D2)],
        # Likewise from {t4} committing t1..t3 with {t1..t4} invalid -> stays {t4}.
        [(0, 3, D4), (6, 0, D1), (6, 1, D2), (6, 2, D3)],
    ]
    t = True
    valid = [
        [t, t, t, t, t, t, False],
        [t, t, False, t, t, t, t],
        [t, t, False, t, t, t, t],
        [t, t, t, False, False, False, False],
        [t] * 7,
        [t, t, t, t, False, t, t],
        [t, t, t, t, t, t, False],
    ]
    full = accept_case(6, P4_POS, P4_TOK, cases, valid)
    assert full == [5, 1, 5, 3, 7, 4, 6]
    for r in range(len(cases)):
        assert accept_case(6, P4_POS, P4_TOK, [cases[r]], [valid[r]]) == [full[r]]


def test_accept_per_row_positions_and_tokens():
    # Different drafted positions and tokens per row in one call.
    fam = draft_family(2)
    k = 4
    commit = torch.zeros((2, 4, k), dtype=torch.bool)
    x0 = torch.zeros((2, 4, k), dtype=torch.long)
    positions = L([[0, 3], [3, 0]])
    tokens = L([[5, 6], [7, 8]])
    # Row 0: base commits position 0 with 5 (= d1 of row 0) -> {t1}.
    commit[0, 0, 0], x0[0, 0, 0] = True, 5
    # Row 1: base commits position 0 with 8 (= d2 of row 1) -> {t2}; also position 3 with 5 (not d1=7).
    commit[1, 0, 0], x0[1, 0, 0] = True, 8
    commit[1, 0, 3], x0[1, 0, 3] = True, 5
    out = accept(commit, x0, positions, tokens, fam, torch.ones((2, 3), dtype=torch.bool))
    assert out.tolist() == [1, 2]


# --------------------------------------------------------------------------------------------
# DecodeConfig ODB knobs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, "0.9", None, True])
def test_config_alp_threshold_range(bad):
    with pytest.raises(ValueError, match="alp_threshold"):
        DecodeConfig(alp_threshold=bad)


def test_config_alp_threshold_edges_ok():
    assert DecodeConfig(alp_threshold=1.0).alp_threshold == 1.0
    assert DecodeConfig(alp_threshold=1e-6).alp_threshold == 1e-6


def test_config_ridge_rows_below_block_length_with_jump():
    with pytest.raises(ValueError, match="ridge_rows"):
        DecodeConfig(jump=True, ridge_rows=31, block_length=32)
    assert DecodeConfig(jump=True, ridge_rows=32, block_length=32).ridge_rows == 32
    with pytest.raises(ValueError, match="ridge_rows"):
        DecodeConfig(ridge_rows=0)
    with pytest.raises(ValueError, match="max_draft_positions"):
        DecodeConfig(max_draft_positions=-1)


@pytest.mark.parametrize("cache", ["prefix", "none"])
def test_config_jump_needs_dual_cache(cache):
    with pytest.raises(ValueError, match="jump"):
        DecodeConfig(jump=True, cache=cache)


def test_config_jump_rejects_quota_rule():
    with pytest.raises(ValueError, match="quota"):
        DecodeConfig(jump=True, rule="quota")
    assert DecodeConfig(jump=True, rule="factor").jump is True


def test_config_alp_cache():
    with pytest.raises(ValueError, match="alp"):
        DecodeConfig(alp=True, cache="none")
    assert DecodeConfig(alp=True, cache="prefix").alp is True
    assert DecodeConfig(alp=True, cache="dual").alp is True


@pytest.mark.parametrize("name", ["alp", "early_stop", "jump"])
@pytest.mark.parametrize("bad", [1, 0, "yes", None])
def test_config_flags_must_be_bool(name, bad):
    with pytest.raises(ValueError, match=name):
        DecodeConfig(**{name: bad})


def test_config_methods_set_odb_flags():
    alp = DecodeConfig.for_method("odb-alp")
    assert (alp.alp, alp.early_stop, alp.jump, alp.rule, alp.cache) == (True, True, False, "threshold", "dual")
    jmp = DecodeConfig.for_method("odb-jump")
    assert (jmp.alp, jmp.early_stop, jmp.jump, jmp.rule, jmp.cache) == (False, True, True, "threshold", "dual")
    odb = DecodeConfig.for_method("odb")
    assert (odb.alp, odb.early_stop, odb.jump, odb.rule, odb.cache) == (True, True, True, "threshold", "dual")
    for plain in ("vanilla", "fast-dllm"):
        c = DecodeConfig.for_method(plain)
        assert (c.alp, c.early_stop, c.jump) == (False, False, False)
    assert {"odb-alp", "odb-jump", "odb"} <= set(METHODS)
    # Knobs on top of a preset; a preset with a bad override still validates.
    assert DecodeConfig.for_method("odb", alp_threshold=0.8).alp_threshold == 0.8
    with pytest.raises(ValueError, match="jump"):
        DecodeConfig.for_method("odb", cache="prefix")


def _accept_by_hand(v, family, valid):
    """The chain rule on one row, state by state: v[branch][i] (the branch verified drafted
    position i), family rows, valid[d]. The furthest reachable state; family order breaks ties."""
    states = [frozenset()] + [frozenset(i for i, f in enumerate(row) if f) for row in family]
    reach = {0}
    for t in sorted(range(1, len(states)), key=lambda t: len(states[t])):
        if valid[t - 1] and any(states[a] < states[t] and all(v[a][i] for i in states[t] - states[a]) for a in reach):
            reach.add(t)
    return max(reach, key=lambda t: (len(states[t]), -t))


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5, 8])
def test_accept_equals_the_chain_rule_state_by_state(p):
    """accept() reaches states through the closure of the verified steps (boolean squaring); on
    random verifications it adopts what the rule applied state by state does, with the engine's
    made-once family and with a copy of it (read back from the device), up to the longest chains
    the default budget drafts (8 positions: a chain of 8 steps takes three squarings)."""
    from vllm_odb.policies.jump import _family_rows

    gen = torch.Generator().manual_seed(p)
    fam = draft_family(p)
    assert draft_family(p) is fam and _family_rows(fam.clone()) == _family_rows(fam)
    d, k, b = fam.shape[0], 8, 64
    positions = torch.stack([torch.randperm(k, generator=gen)[:p] for _ in range(b)])
    tokens = torch.randint(0, 5, (b, p), generator=gen)
    likely = {5: 0.85, 8: 0.9}.get(p, 0.7)  # long chains need most steps verified
    commit = torch.rand((b, 1 + d, k), generator=gen) < likely
    x0 = torch.randint(0, 5, (b, 1 + d, k), generator=gen)
    x0.scatter_(2, positions[:, None].expand(-1, 1 + d, -1),
                torch.where(torch.rand((b, 1 + d, p), generator=gen) < likely, tokens[:, None], 9))
    valid = torch.rand((b, d), generator=gen) < 0.9
    pos = positions[:, None, :].expand(b, 1 + d, p)
    v = (commit.gather(2, pos) & (x0.gather(2, pos) == tokens[:, None, :])).tolist()
    want = [_accept_by_hand(v[r], fam.tolist(), valid[r].tolist()) for r in range(b)]
    assert accept(commit, x0, positions, tokens, fam, valid).tolist() == want
    assert accept(commit, x0, positions, tokens, fam.clone(), valid).tolist() == want
    assert len(set(want)) >= min(3, 1 + d)  # the cases reach several states
    sizes = [0] + fam.sum(1).tolist()
    assert max(sizes[w] for w in want) >= min(p, 5)  # and deep ones


@pytest.mark.parametrize("shift", [0, 1])
def test_plans_in_fixed_rows_decide_as_plans_laid_out_as_they_come(shift):
    """``plan_branches(rows=Q)`` (the engine: shapes known on the host, nothing read back) against
    the plan without it (the reference): the same valid drafts, rows, tokens, offsets, mask and
    logit rows, padding after them that sees no new row; a request whose drafts would not fit Q
    rows has none; and ``positions_bound`` bounds every request's own count."""
    from vllm_odb.policies.jump import DraftBudget, plan_drafts, positions_bound
    from vllm_odb.policies.step import plan_branches

    gen = torch.Generator().manual_seed(11 + shift)
    k, mask, cut = 8, 5, 0
    for _ in range(150):
        b = 3
        block, before, x0, conf = _random_blocks(gen, b, k, shift, mask, 5)
        ridge = int(torch.randint(k, 120, (1,), generator=gen))
        live = int(torch.randint(1, 4, (1,), generator=gen))
        cfg = DecodeConfig(rule="threshold", cache="dual", jump=True, ridge_rows=ridge, block_length=k,
                           gen_length=4 * k)
        free = plan_branches(block, before, x0, conf, block == mask, cfg, live)
        q = int(torch.randint(k + shift, 80, (1,), generator=gen))
        fixed = plan_branches(block, before, x0, conf, block == mask, cfg, live, rows=q)
        p_own, _ = plan_drafts(DraftBudget(ridge, cfg.max_draft_positions), live, k + shift, (block == mask).sum(1),
                               1 + shift)
        bound = positions_bound(DraftBudget(ridge, cfg.max_draft_positions), live, k + shift, k)
        assert fixed.family.shape[1] == bound >= int(p_own.max())
        nf = free.family.shape[0]
        for r in range(b):
            n = int(free.layout.num_rows[r])
            assert fixed.layout.tokens.shape[1] == q
            if n > q:
                cut += 1
                assert not fixed.valid[r].any() and int(fixed.layout.num_rows[r]) == k + shift
                continue
            assert torch.equal(fixed.valid[r, :nf], free.valid[r]) and not fixed.valid[r, nf:].any()
            assert int(fixed.layout.num_rows[r]) == n
            for a, c in ((fixed.layout.tokens, free.layout.tokens), (fixed.layout.offset, free.layout.offset)):
                assert torch.equal(a[r, :n], c[r, :n])
            assert torch.equal(fixed.layout.attn[r, :n, :n], free.layout.attn[r, :n, :n])
            assert not fixed.layout.attn[r, n:].any() and not fixed.layout.attn[r, :, n:].any()
            assert (fixed.layout.branch[r, n:] == -1).all()
            assert torch.equal(fixed.layout.pred_row[r, :nf + 1], free.layout.pred_row[r])
            assert torch.equal(fixed.layout.pred_row[r, nf + 1:], fixed.layout.pred_row[r, :1].expand(-1, k)
                               .expand(fixed.layout.pred_row.shape[1] - nf - 1, -1))  # invalid: the base's rows
    assert cut > 0  # some requests had no room


@pytest.mark.parametrize("rule", ["threshold", "factor"])
def test_a_branch_step_from_row_predictions_decides_as_one_from_logits(rule):
    """The engine predicts each query row once and gathers the predictions through ``pred_row``
    (``branch_step(preds=...)``); the reference decides on each branch's gathered logits. Same
    blocks, predictions, confidences and adopted drafts; sampling is refused there."""
    from vllm_odb.policies.confidence import drop_token, predict
    from vllm_odb.policies.step import branch_step, plan_branches

    gen = torch.Generator().manual_seed(3)
    b, k, vocab, mask, q = 4, 8, 40, 39, 64
    cfg = DecodeConfig(rule=rule, cache="dual", jump=True, ridge_rows=64, block_length=k, gen_length=4 * k,
                       threshold=0.5, factor=1.0)
    block = torch.where(torch.rand(b, k, generator=gen) < 0.8, mask, torch.randint(0, 30, (b, k), generator=gen))
    x0, conf = torch.randint(0, 30, (b, k), generator=gen), torch.rand(b, k, generator=gen)
    br = plan_branches(block, block[:, :0], x0, conf, block == mask, cfg, 1, rows=q)
    assert br.valid.any()
    rows = torch.randn(b, q, vocab, generator=gen)
    rows.scatter_(2, x0[:, None, :].expand(b, q, k)[:, :, :1], 6.0)  # confident rows, some drafts verified
    nb = br.blocks.shape[1]
    pred = br.layout.pred_row.reshape(b, -1)
    logits = rows.gather(1, pred[:, :, None].expand(-1, -1, vocab)).view(b, nb, k, vocab)
    active = (block == mask).any(1)
    want = branch_step(logits, br, active, cfg, mask)
    px0, pconf = predict(drop_token(rows, mask), cfg.confidence)
    preds = tuple(t.gather(1, pred).view(b, nb, k) for t in (px0, pconf))
    got = branch_step(None, br, active, cfg, mask, preds=preds)
    for x, y in ((got.block, want.block), (got.x0, want.x0), (got.conf, want.conf), (got.accepted, want.accepted)):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="greedy"):
        branch_step(None, br, active, cfg.replace(temperature=0.5), mask, preds=preds)


def test_fixed_rows_must_hold_the_base_window():
    from vllm_odb.policies.step import plan_branches

    cfg = DecodeConfig(rule="threshold", cache="dual", jump=True, ridge_rows=64, block_length=8, gen_length=32)
    block = torch.full((1, 8), 5)
    with pytest.raises(ValueError, match="7 rows cannot hold the base window of 9"):
        plan_branches(block, block[:, :1], block, torch.rand(1, 8), block == 5, cfg, 1, rows=7)


@pytest.mark.parametrize("window", [4, 8, 33])
def test_plan_drafts_counts_two_rows_a_masked_position_for_shifted_logits(window):
    """With ``rows_per_mask`` 2 (Dream: a draft's row at each masked position and the one before
    it) the shared layout's bound is window + (2p - 1) * 2m rows: the largest p within the share."""
    ms = list(range(0, 41))
    for ridge, n_req in itertools.product([16, 64, 100, 158, 256, 512], [1, 2, 3, 8]):
        share = ridge // n_req
        p, shared = plan_drafts(DraftBudget(ridge, 8), n_req, window, L(ms), 2)
        for m, pi, si in zip(ms, p.tolist(), shared.tolist()):
            cap = max(0, min(m - 1, 8))
            best_full = max(q for q in range(cap + 1) if 2 * q * window <= share)
            best_shared = max((q for q in range(1, cap + 1) if window + (2 * q - 1) * 2 * m <= share), default=0)
            assert (pi, si) == (max(best_full, best_shared), best_shared > best_full), (ridge, n_req, window, m)


def test_dream_layouts_stay_within_the_draft_budget():
    """A jump-share step's layout takes at most the request's share of ``ridge_rows`` (or the base
    window), with Dream's shifted logits too: the budget is query rows, as the knob says. (Before
    session 14 Dream's reached ``2 * share - window``.)"""
    from vllm_odb.policies.step import plan_branches

    g = torch.Generator().manual_seed(3)
    mask = 99
    for trial in range(60):
        k, shift = (8, 16, 32)[trial % 3], trial % 2
        b = 3
        block, before, x0, conf = _random_blocks(g, b, k, shift, mask, 50)
        ridge, live = int(torch.randint(k, 300, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        cfg = DecodeConfig(rule="threshold", cache="dual", jump=True, ridge_rows=ridge, block_length=k,
                           gen_length=4 * k)
        br = plan_branches(block, before, x0, conf, block == mask, cfg, live)
        assert int(br.layout.num_rows.max()) <= max(k + shift, ridge // live), (trial, ridge, live, k, shift)
