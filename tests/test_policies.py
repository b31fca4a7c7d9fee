"""CPU tests for vllm_odb.policies: commit rules, confidences, quota schedules, decide, config.

Every rule is checked on hand-built, batched tensors whose rows are in different situations, so a
row that borrowed anything from its neighbour would show up as a wrong expected mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_odb.policies import (
    METHODS,
    DecodeConfig,
    commit_best,
    commit_factor,
    commit_threshold,
    commit_topk,
    decide,
    dream_quota,
    linear_quota,
    predict,
)
from vllm_odb.policies.confidence import drop_token, gumbel_noise
from vllm_odb.policies.host import to_device


def T(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def B(rows):
    return torch.tensor(rows, dtype=torch.bool)


def positions(mask_row):
    return sorted(torch.nonzero(mask_row).flatten().tolist())


def below(x: float) -> float:
    """The float32 value just below x."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-1.0)).item()


# ----------------------------------------------------------------------------- commit_threshold


def test_threshold_boundary_is_inclusive_and_just_below_is_not():
    tau = 0.9
    just_below = below(tau)
    assert just_below < torch.tensor(tau, dtype=torch.float32).item()
    conf = T([
        # row 0: pos 1 exactly tau (commit), pos 2 just below (no), pos 0 the best (always)
        [0.95, tau, just_below, 0.1],
        # row 1: exactly tau at pos 3 and the best; just below at pos 0 is not committed
        [just_below, 0.2, 0.3, tau],
    ])
    masked = B([[1, 1, 1, 1], [1, 1, 1, 1]])
    out = commit_threshold(conf, masked, tau)
    assert out.dtype == torch.bool
    assert out.tolist() == [[True, True, False, False], [False, False, False, True]]


def test_threshold_always_commits_best_masked_even_all_below():
    conf = T([
        [0.1, 0.5, 0.3, 0.2],   # all below tau: only the argmax (pos 1)
        [0.4, 0.2, 0.1, 0.35],  # all below tau: only pos 0
        [0.95, 0.3, 0.91, 0.1],  # two above tau, no extra
    ])
    masked = torch.ones(3, 4, dtype=torch.bool)
    out = commit_threshold(conf, masked, 0.9)
    assert out.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [True, False, True, False],
    ]


def test_threshold_never_commits_unmasked_even_if_most_confident():
    conf = T([
        [0.99, 0.3, 0.98, 0.2],  # pos 0, 2 unmasked and highest; best masked is pos 1
        [0.1, 0.999, 0.95, 0.5],  # pos 1 unmasked and highest; pos 2 masked above tau
    ])
    masked = B([[0, 1, 0, 1], [1, 0, 1, 1]])
    out = commit_threshold(conf, masked, 0.9)
    assert out.tolist() == [[False, True, False, False], [False, False, True, False]]
    assert not (out & ~masked).any()


def test_threshold_row_without_masked_commits_nothing():
    conf = T([
        [0.99, 0.95, 0.97],  # nothing masked, all above tau
        [0.2, 0.95, 0.1],    # masked: pos 1 above tau
        [0.5, 0.6, 0.7],     # nothing masked, all below tau (the "best" must not be forced)
    ])
    masked = B([[0, 0, 0], [1, 1, 1], [0, 0, 0]])
    out = commit_threshold(conf, masked, 0.9)
    assert out.tolist() == [[False] * 3, [False, True, False], [False] * 3]
    assert commit_best(conf, masked).tolist() == [[False] * 3, [False, True, False], [False] * 3]


def test_threshold_per_row_tensor():
    conf = T([
        [0.85, 0.75, 0.65, 0.55],
        [0.85, 0.75, 0.65, 0.55],
        [0.85, 0.75, 0.65, 0.55],
    ])
    masked = torch.ones(3, 4, dtype=torch.bool)
    tau = torch.tensor([0.9, 0.7, 0.6])
    out = commit_threshold(conf, masked, tau)
    assert out.tolist() == [
        [True, False, False, False],   # none >= 0.9: only the best
        [True, True, False, False],    # >= 0.7
        [True, True, True, False],     # >= 0.6
    ]
    # The scalar form applies the same threshold to every row.
    assert commit_threshold(conf, masked, 0.7).tolist() == [[True, True, False, False]] * 3


# ------------------------------------------------------------------------------- commit_factor


def test_factor_hand_computed_examples():
    # f = 1: threshold on the n-th largest confidence is 1 - 1/(n+1) = 0.5, 0.667, 0.75, 0.8, 0.833
    # row 0 sorted [0.99, 0.95, 0.7, 0.6]: n=1 forced, n=2: 0.95 >= 0.667 ok (3*0.05=0.15 <= 1),
    #   n=3: 0.7 < 0.75 (4*0.3=1.2 > 1) -> n = 2.
    # row 1 sorted [0.99, 0.98, 0.97, 0.96, 0.5]: 3*.02, 4*.03, 5*.04 <= 1; 6*0.5=3 > 1 -> n = 4
    #   (the released code's "fail only on the last rank commits all" quirk is deliberately absent).
    # row 2 sorted [0.6, 0.4, ...]: n=2 needs 0.4 >= 0.667, fails -> n = 1 (forced even though
    #   2*(1-0.6) = 0.8 happens to pass, the rule guarantees at least one).
    conf = T([
        [0.7, 0.99, 0.6, 0.95, 0.1],
        [0.96, 0.5, 0.99, 0.97, 0.98],
        [0.2, 0.4, 0.6, 0.1, 0.3],
    ])
    masked = torch.ones(3, 5, dtype=torch.bool)
    out = commit_factor(conf, masked, 1.0)
    assert [positions(r) for r in out] == [[1, 3], [0, 2, 3, 4], [2]]


def test_factor_exact_boundary_passes():
    # f = 1, n = 3: (3+1) * (1 - 0.75) = 1.0 <= 1 -> passes (all values exact in float32).
    conf = T([[0.75, 1.0, 0.875, 0.5], [0.74, 1.0, 0.875, 0.5]])
    masked = torch.ones(2, 4, dtype=torch.bool)
    out = commit_factor(conf, masked, 1.0)
    assert [positions(r) for r in out] == [[0, 1, 2], [1, 2]]


def test_factor_at_least_one_even_with_tiny_confidences():
    conf = T([[0.01, 0.02, 0.03], [0.3, 0.2, 0.1]])
    masked = torch.ones(2, 3, dtype=torch.bool)
    out = commit_factor(conf, masked, 0.1)
    assert [positions(r) for r in out] == [[2], [0]]
    assert (out.sum(1) == 1).all()


def test_factor_is_prefix_of_ranking_and_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(6, 12, generator=g) * 0.5 + 0.5
    masked = torch.rand(6, 12, generator=g) < 0.7
    masked[:, 0] = True
    factors = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 3.0])
    out = commit_factor(conf, masked, factors)
    for b in range(6):
        idx = torch.nonzero(masked[b]).flatten()
        vals, order = conf[b, idx].sort(descending=True)
        f = factors[b].item()
        n = 1
        for m in range(2, len(vals) + 1):
            if (m + 1) * (1 - vals[m - 1].item()) <= f:
                n = m
        expected = sorted(idx[order[:n]].tolist())
        assert positions(out[b]) == expected, (b, f)
        # prefix: every committed confidence >= every uncommitted masked confidence
        c_in = conf[b][out[b]]
        c_out = conf[b][masked[b] & ~out[b]]
        if len(c_out):
            assert c_in.min() >= c_out.max()


def test_factor_masked_only_and_empty_rows():
    conf = T([
        [0.999, 0.998, 0.6, 0.99],  # pos 0, 1 unmasked and top; masked sorted [0.99, 0.6]
        [0.999, 0.999, 0.999, 0.999],  # nothing masked
        [0.99, 0.98, 0.97, 0.999],  # pos 3 unmasked; masked 0.99, 0.98, 0.97 all pass with f=1
    ])
    masked = B([[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])
    out = commit_factor(conf, masked, 1.0)
    assert [positions(r) for r in out] == [[3], [], [0, 1, 2]]
    assert not (out & ~masked).any()


def test_factor_per_row_tensor():
    # sorted [0.9, 0.8, 0.7, 0.6]; n=2: 3*0.2=0.6, n=3: 4*0.3=1.2, n=4: 5*0.4=2.0
    conf = T([[0.6, 0.7, 0.8, 0.9]] * 3)
    masked = torch.ones(3, 4, dtype=torch.bool)
    out = commit_factor(conf, masked, torch.tensor([0.5, 1.0, 2.0]))
    assert [positions(r) for r in out] == [[3], [2, 3], [0, 1, 2, 3]]


# --------------------------------------------------------------------------------- commit_topk


def test_topk_exact_k_highest_masked_only():
    conf = T([
        [0.1, 0.9, 0.5, 0.7, 0.3],
        [0.99, 0.2, 0.8, 0.4, 0.6],   # pos 0 unmasked though highest
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ])
    masked = B([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    k = torch.tensor([2, 3, 1])
    out = commit_topk(conf, masked, k)
    assert [positions(r) for r in out] == [[1, 3], [2, 3, 4], [0]]
    assert out.sum(1).tolist() == [2, 3, 1]
    assert not (out & ~masked).any()


def test_topk_clipped_to_masked_and_zero_commits_nothing():
    conf = T([
        [0.9, 0.8, 0.7, 0.6],  # 2 masked, k=4 -> both
        [0.9, 0.8, 0.7, 0.6],  # k=0 -> nothing
        [0.9, 0.8, 0.7, 0.6],  # nothing masked, k=2 -> nothing
        [0.1, 0.2, 0.3, 0.4],  # all masked, k=4 -> all
    ])
    masked = B([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = commit_topk(conf, masked, torch.tensor([4, 0, 2, 4]))
    assert [positions(r) for r in out] == [[1, 3], [], [], [0, 1, 2, 3]]


def test_topk_with_linear_quota_row_counts():
    conf = torch.linspace(0, 1, 16).view(2, 8)
    masked = torch.ones(2, 8, dtype=torch.bool)
    masked[1, :5] = False
    q = linear_quota(masked.sum(1), 2)  # row 0: 8 -> [4, 4]; row 1: 3 -> [2, 1]
    assert q.tolist() == [[4, 4], [2, 1]]
    out = commit_topk(conf, masked, q[:, 0])
    assert [positions(r) for r in out] == [[4, 5, 6, 7], [6, 7]]


# -------------------------------------------------------------------------------- linear_quota


def test_linear_quota_examples():
    n = torch.tensor([10, 2, 0, 8, 13])
    q = linear_quota(n, 4)
    assert q.dtype == torch.long
    assert q.shape == (5, 4)
    assert q.tolist() == [
        [3, 3, 2, 2],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [2, 2, 2, 2],
        [4, 3, 3, 3],
    ]
    assert q.sum(1).tolist() == n.tolist()


def test_linear_quota_rows_sum_and_shape_property():
    n = torch.arange(0, 70)
    for steps in (1, 3, 7, 32):
        q = linear_quota(n, steps)
        assert (q.sum(1) == n).all()
        # non-increasing and max-min <= 1 (remainder to the first steps)
        assert (q[:, :-1] >= q[:, 1:]).all()
        assert (q.max(1).values - q.min(1).values <= 1).all()


# --------------------------------------------------------------------------------- dream_quota


def _simulate_dream(n: int, steps: int) -> list[int]:
    remaining, seq = n, []
    for i in range(steps):
        k = dream_quota(float(remaining), i, steps)
        assert 0 <= k <= remaining, (i, k, remaining)
        seq.append(k)
        remaining -= k
    return seq


@pytest.mark.parametrize("n", [32, 64, 128])
def test_dream_quota_steps_equal_length(n):
    # models.md 4.6 "Schedule detail": step 0 commits 0, steps 1..S-2 one each, the last step 2.
    seq = _simulate_dream(n, n)
    assert seq == [0] + [1] * (n - 2) + [2]
    assert sum(seq) == n


@pytest.mark.parametrize("n", [32, 64, 128])
def test_dream_quota_half_steps(n):
    # S = N/2: 1 on step 0, then 2 per step, 3 on the last step.
    s = n // 2
    seq = _simulate_dream(n, s)
    assert seq == [1] + [2] * (s - 2) + [3]
    assert sum(seq) == n


def test_dream_quota_256_over_8():
    seq = _simulate_dream(256, 8)
    assert seq == [31, 32, 32, 32, 32, 32, 32, 33]


def test_dream_quota_last_step_takes_everything_left_and_uses_mean():
    assert dream_quota(7.0, 9, 10) == 7
    assert dream_quota(7.0, 15, 10) == 7
    # batch-average count (30 + 34) / 2 = 32, S = 16: int(32 * (1 - s/t)) at step 0 -> 1
    assert dream_quota((30 + 34) / 2, 0, 16) == 1
    # truncation, not rounding: float32 linspace step 1 with S = N = 32 is int(31 * 0.0322..) = 0/1
    ts = torch.linspace(1.0, 1e-3, 33, dtype=torch.float32)
    expected = int(torch.tensor(31.0) * (1 - ts[2] / ts[1]))
    assert dream_quota(31.0, 1, 32) == expected


# ------------------------------------------------------------------------------------- predict


def test_predict_prob_argmax_and_softmax_prob():
    logits = T([
        [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
        [[-1.0, 5.0, 4.0], [1.0, 1.0, 1.0]],
    ])
    x0, conf = predict(logits, "prob")
    assert x0.dtype == torch.long and conf.dtype == torch.float32
    assert x0.shape == (2, 2) and conf.shape == (2, 2)
    assert x0[:, 0].tolist() == [0, 1] and x0[0, 1].item() == 2
    p = torch.softmax(logits, -1)
    assert torch.allclose(conf, p.max(-1).values)
    e = math.exp
    assert conf[0, 0].item() == pytest.approx(e(2) / (e(2) + e(1) + 1), rel=1e-5)
    assert conf[1, 1].item() == pytest.approx(1 / 3, rel=1e-5)


def test_predict_margin():
    logits = T([[0.0, math.log(6), math.log(3)], [math.log(5), math.log(4), math.log(1)]])
    # probs: row 0 [0.1, 0.6, 0.3] -> 0.3; row 1 [0.5, 0.4, 0.1] -> 0.1
    x0, conf = predict(logits, "margin")
    assert x0.tolist() == [1, 0]
    assert conf.tolist() == pytest.approx([0.3, 0.1], abs=1e-5)


def test_predict_neg_entropy():
    logits = T([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0.0, -0.5]])
    x0, conf = predict(logits, "neg_entropy")
    p = torch.softmax(logits.double(), -1)
    expected = (p * p.log()).sum(-1)
    assert conf.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert (conf <= 0).all()
    assert conf[1].item() == pytest.approx(-math.log(4), abs=1e-5)  # uniform: minimum
    assert conf[0] > conf[2] > conf[1]  # peaked is higher (surer)


def test_predict_unknown_kind_raises():
    with pytest.raises(ValueError, match="confidence"):
        predict(torch.zeros(1, 3), "bogus")


def test_predict_temperature_zero_is_deterministic_argmax():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1))
    x_a, c_a = predict(logits, "prob", 0.0, torch.Generator().manual_seed(1))
    x_b, c_b = predict(logits, "prob", 0.0, torch.Generator().manual_seed(2))
    x_c, c_c = predict(logits, "prob", 0.0, None)
    assert torch.equal(x_a, logits.argmax(-1))
    assert torch.equal(x_a, x_b) and torch.equal(x_a, x_c)
    assert torch.equal(c_a, c_b) and torch.equal(c_a, c_c)


def test_predict_temperature_seeded_is_reproducible():
    logits = torch.zeros(4, 16, 8)
    x_a, c_a = predict(logits, "prob", 1.0, torch.Generator().manual_seed(123))
    x_b, c_b = predict(logits, "prob", 1.0, torch.Generator().manual_seed(123))
    x_c, _ = predict(logits, "prob", 1.0, torch.Generator().manual_seed(124))
    assert torch.equal(x_a, x_b) and torch.equal(c_a, c_b)
    assert not torch.equal(x_a, x_c)  # 64 uniform draws over 8 tokens: a collision is ~impossible
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gumbel_noise((3, 4), g1, "cpu"), gumbel_noise((3, 4), g2, "cpu"))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_predict_gumbel_samples_softmax_over_temperature(temperature):
    base = T([1.0, 0.0, -1.0])
    draws = 4000
    logits = base.expand(draws, 3).clone()
    x0, conf = predict(logits, "prob", temperature, torch.Generator().manual_seed(7))
    freq = torch.bincount(x0, minlength=3).double() / draws
    target = torch.softmax(base.double() / temperature, -1)
    assert torch.allclose(freq, target, atol=0.03), (freq, target)
    if temperature != 1.0:
        # the tempered target really differs from plain softmax(logits) here
        plain = torch.softmax(base.double(), -1)
        assert (freq - plain).abs().max() > 0.05
    # every token appears: it really samples
    assert (torch.bincount(x0, minlength=3) > 0).all()
    # conf is the un-noised (untempered) probability of the sampled token
    p = torch.softmax(base, -1)
    assert torch.allclose(conf, p[x0])


def test_predict_gumbel_conf_is_prob_of_sampled_token_batched():
    logits = torch.randn(2, 50, 6, generator=torch.Generator().manual_seed(3))
    x0, conf = predict(logits, "prob", 1.5, torch.Generator().manual_seed(4))
    p = torch.softmax(logits, -1)
    assert torch.allclose(conf, p.gather(-1, x0.unsqueeze(-1)).squeeze(-1))
    assert not torch.equal(x0, logits.argmax(-1))  # noise moved at least one of 100 picks


# -------------------------------------------------------------------------------------- decide


MASK = 5


def _logits_for(confs_rows, vocab=6, mask_logit=None):
    """[B, N, V] logits whose argmax is token (pos % (V-1)) with softmax prob ~ the given conf
    over the non-mask tokens; the mask token optionally gets the largest logit."""
    b, n = len(confs_rows), len(confs_rows[0])
    logits = torch.full((b, n, vocab), 0.0)
    for i, row in enumerate(confs_rows):
        for j, c in enumerate(row):
            tok = j % (vocab - 1)
            # p(tok) = c over the vocab - 1 real tokens: others equal -> logit gap log(c*(V-2)/(1-c))
            logits[i, j, tok] = math.log(c * (vocab - 2) / (1 - c))
            logits[i, j, MASK] = mask_logit if mask_logit is not None else -50.0
    return logits


def test_decide_never_predicts_mask_id():
    logits = _logits_for([[0.95, 0.5, 0.3], [0.2, 0.8, 0.99]], mask_logit=100.0)
    masked = torch.ones(2, 3, dtype=torch.bool)
    for temperature in (0.0, 1.0):
        cfg = DecodeConfig(rule="threshold", temperature=temperature)
        x0, conf, commit = decide(logits, masked, cfg, MASK, generator=torch.Generator().manual_seed(0))
        assert (x0 != MASK).all()
        if temperature == 0.0:
            assert x0.tolist() == [[0, 1, 2], [0, 1, 2]]
            # the mask logit is dropped before the softmax: conf is over the real tokens
            assert torch.allclose(conf, T([[0.95, 0.5, 0.3], [0.2, 0.8, 0.99]]), atol=1e-5)
            assert commit.tolist() == [[True, False, False], [False, False, True]]
    # the caller's logits are not modified in place
    assert (logits[..., MASK] == 100.0).all()


def test_decide_dispatches_by_rule():
    confs = [
        [0.99, 0.95, 0.7, 0.6, 0.3],
        [0.5, 0.93, 0.92, 0.91, 0.2],
    ]
    logits = _logits_for(confs)
    masked = B([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    quota = torch.tensor([3, 1])

    _, conf, c_thr = decide(logits, masked, DecodeConfig(rule="threshold", threshold=0.9), MASK)
    assert torch.allclose(conf, T(confs), atol=1e-5)
    assert torch.equal(c_thr, commit_threshold(conf, masked, 0.9))
    assert [positions(r) for r in c_thr] == [[0, 1], [1, 2, 3]]

    # f = 1: row 0 sorted [.99, .95, .7, ...] -> 2; row 1 sorted [.93, .92, .91, .2]:
    #   3*.08 = .24, 4*.09 = .36, 5*.8 = 4 -> 3
    _, _, c_fac = decide(logits, masked, DecodeConfig(rule="factor", factor=1.0), MASK)
    assert torch.equal(c_fac, commit_factor(conf, masked, 1.0))
    assert [positions(r) for r in c_fac] == [[0, 1], [1, 2, 3]]
    _, _, c_fac2 = decide(logits, masked, DecodeConfig(rule="factor", factor=0.3), MASK)
    # f = 0.3: row 0: 3*.05 = .15 ok, 4*.3 no -> 2; row 1: 3*.08=.24 ok, 4*.09=.36 no -> 2
    assert [positions(r) for r in c_fac2] == [[0, 1], [1, 2]]

    _, _, c_q = decide(logits, masked, DecodeConfig(rule="quota"), MASK, quota=quota)
    assert torch.equal(c_q, commit_topk(conf, masked, quota))
    assert [positions(r) for r in c_q] == [[0, 1, 2], [1]]


def test_decide_quota_without_quota_raises():
    logits = _logits_for([[0.9, 0.5], [0.4, 0.6]])
    masked = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="quota"):
        decide(logits, masked, DecodeConfig(rule="quota"), MASK)


def test_decide_confidence_kind_is_used():
    confs = [[0.9, 0.6], [0.7, 0.95]]
    logits = _logits_for(confs)
    masked = torch.ones(2, 2, dtype=torch.bool)
    _, conf, _ = decide(logits, masked, DecodeConfig(confidence="neg_entropy"), MASK)
    probs = torch.softmax(logits.index_fill(-1, torch.tensor([MASK]), float("-inf")), -1)
    expected = (probs * torch.log(probs + 1e-10)).sum(-1)
    assert torch.allclose(conf, expected, atol=1e-5)
    _, conf_m, _ = decide(logits, masked, DecodeConfig(confidence="margin"), MASK)
    top2 = probs.topk(2, -1).values
    assert torch.allclose(conf_m, top2[..., 0] - top2[..., 1], atol=1e-5)


# -------------------------------------------------------------------------------- DecodeConfig


def test_config_defaults():
    cfg = DecodeConfig()
    assert cfg.threshold == 0.9
    assert cfg.block_length == 32
    assert cfg.gen_length == 128
    assert cfg.rule == "threshold" and cfg.cache == "dual" and cfg.confidence == "prob"
    assert cfg.schedule == "linear" and cfg.temperature == 0.0 and cfg.factor == 1.0
    assert cfg.steps is None
    assert cfg.num_blocks == 4
    assert cfg.steps_per_block == 32


@pytest.mark.parametrize("knobs, name", [
    ({"gen_length": 100, "block_length": 32}, "gen_length"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -1}, "threshold"),
    ({"block_length": 0}, "block_length"),
    ({"gen_length": 0}, "gen_length"),
    ({"rule": "greedy"}, "rule"),
    ({"cache": "full"}, "cache"),
    ({"confidence": "entropy"}, "confidence"),
    ({"schedule": "cosine"}, "schedule"),
    ({"temperature": -0.1}, "temperature"),
    ({"factor": 0.0}, "factor"),
    ({"rule": "quota", "steps": 6}, "steps"),          # 4 blocks, 6 not a multiple
    ({"rule": "threshold", "steps": 64}, "steps"),     # steps only with quota
    ({"rule": "quota", "steps": 256}, "steps"),        # more steps than tokens
    ({"rule": "quota", "steps": 0}, "steps"),
])
def test_config_invalid_knob_names_itself(knobs, name):
    with pytest.raises(ValueError, match=name):
        DecodeConfig(**knobs)


def test_config_valid_edges():
    assert DecodeConfig(threshold=1.0).threshold == 1.0
    cfg = DecodeConfig(rule="quota", steps=64)
    assert cfg.steps_per_block == 16
    assert DecodeConfig(rule="quota", steps=4).steps_per_block == 1
    assert DecodeConfig(gen_length=64, block_length=64, schedule="dream").num_blocks == 1
    with pytest.raises(ValueError, match="dream"):
        DecodeConfig(gen_length=64, block_length=32, schedule="dream")


def test_config_from_dict_unknown_key_lists_it():
    with pytest.raises(ValueError, match="tresh"):
        DecodeConfig.from_dict({"threshold": 0.8, "tresh": 0.5})
    cfg = DecodeConfig.from_dict({"threshold": 0.8, "cache": "prefix"})
    assert cfg.threshold == 0.8 and cfg.cache == "prefix"


def test_config_for_method():
    with pytest.raises(ValueError) as e:
        DecodeConfig.for_method("nope")
    assert "nope" in str(e.value)
    for m in METHODS:
        assert m in str(e.value)
    assert "vanilla" in str(e.value) and "fast-dllm" in str(e.value)

    v = DecodeConfig.for_method("vanilla")
    assert v.rule == "quota" and v.cache == "none"
    assert v.steps_per_block == v.block_length  # one token per step by default
    f = DecodeConfig.for_method("fast-dllm")
    assert f.rule == "threshold" and f.cache == "dual" and f.threshold == 0.9
    # knobs override, None knobs are ignored, and the preset table is not mutated
    f2 = DecodeConfig.for_method("fast-dllm", threshold=0.7, steps=None)
    assert f2.threshold == 0.7 and f2.steps is None
    assert METHODS["fast-dllm"] == {"rule": "threshold", "cache": "dual"}
    with pytest.raises(ValueError, match="steps"):
        DecodeConfig.for_method("fast-dllm", steps=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_token_masks_one_column_in_fp32_and_leaves_the_input(dtype):
    logits = torch.randn(2, 3, 7).to(dtype)
    before = logits.clone()
    out = drop_token(logits, 4)
    assert out.dtype == torch.float32
    assert torch.equal(logits, before)  # an fp32 input is not written in place
    assert torch.isneginf(out[..., 4]).all()
    keep = [i for i in range(7) if i != 4]
    assert torch.equal(out[..., keep], before.float()[..., keep])


def test_to_device_keeps_values_and_dtype():
    import numpy as np

    assert torch.equal(to_device([3, 1, 2], "cpu"), torch.tensor([3, 1, 2]))
    t = to_device(np.array([5, 6], dtype=np.int64), torch.device("cpu"), torch.int32)
    assert t.dtype == torch.int32 and t.tolist() == [5, 6]
    assert to_device([], "cpu").shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_and_a_decision_do_not_sync_the_stream():
    """The engine sampler's per-step transfers must not wait for the forward queued before them:
    torch's sync debug mode raises on any synchronising call."""
    from vllm_odb.policies.jump import _FAMILIES, _PLANS, accept, draft_family
    from vllm_odb.policies.length import marker_hits
    from vllm_odb.policies.step import block_ends

    x = torch.randn(4, 8, 1000, device="cuda")
    tokens, conf = torch.randint(0, 9, (2, 8), device="cuda"), torch.rand(2, 8, device="cuda")
    jump = {}
    for p in (2, 3):
        d = 2 * p - 1
        jump[p] = (torch.rand(2, 1 + d, 8, device="cuda") < 0.5, torch.randint(0, 4, (2, 1 + d, 8), device="cuda"),
                   torch.stack([torch.randperm(8)[:p] for _ in range(2)]).cuda(), torch.randint(0, 4, (2, p), device="cuda"),
                   torch.ones(2, d, dtype=torch.bool, device="cuda"))
    _FAMILIES.clear()  # made inside the checked region below, with acceptance's plans
    _PLANS.clear()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            torch.tensor([1, 2], device="cuda")  # the pattern this replaces does sync
        idx = to_device([0, 2], "cuda")
        out = drop_token(x[idx], 3)
        masked = torch.ones(2, 8, dtype=torch.bool, device="cuda")
        cfg = DecodeConfig.for_method("fast-dllm", gen_length=32, block_length=8)
        decide(x[idx], masked, cfg, 3)  # the float threshold stays a host number
        decide(x[idx], masked, cfg, 3, threshold=to_device([0.5, 0.9], "cuda", torch.float32))
        # every step's end-marker check, and jump-share's acceptance with the made-once family
        # (made here too: its first use must not wait either)
        block_ends(tokens, [((3,), (5, 6))] * 2)
        marker_hits(tokens, [(3,), (5, 6)], conf=conf, theta=0.5)
        for p, (commit, x0, pos, drafted, valid) in jump.items():
            accept(commit, x0, pos, drafted, draft_family(p, "cuda"), valid)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert idx.tolist() == [0, 2] and torch.isneginf(out[..., 3]).all()
