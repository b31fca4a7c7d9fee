"""``bench vllm-parity``'s verdict and agreement share (CPU; the runs themselves need a GPU)."""

from __future__ import annotations

import pytest

from vllm_odb.bench.parity import prefix_share, verdict


def _summary(dtype="float32", alone=8, batched=8, nfe=(40, 40), drafts=(58, 58)):
    return {"dtype": dtype, "counts_required": dtype == "float32", "alone_match": alone, "batched_match": batched,
            "nfe": {"reference": nfe[0], "vllm": nfe[1]}, "canvas": {"reference": 160, "vllm": 160},
            "drafts_accepted": {"reference": drafts[0], "vllm": drafts[1]}}


@pytest.mark.parametrize("kw, jump, want", [
    ({}, False, True),
    ({"alone": 7}, False, False),                                 # a prompt alone differs: fails anywhere
    ({"alone": 7, "dtype": "bfloat16"}, True, False),
    ({"batched": 7}, False, False),                               # batched tokens required off jump-share
    ({"batched": 7}, True, True),                                 # jump-share's budget is shared by the batch
    ({"nfe": (41, 40)}, False, False),                            # fp32: the counts are required
    ({"nfe": (41, 40), "drafts": (58, 59), "dtype": "bfloat16"}, True, True),  # bf16: reported only
])
def test_verdict(kw, jump, want):
    assert verdict(_summary(**kw), 8, jump) is want


def test_prefix_share():
    assert prefix_share([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6, 7]]) == pytest.approx(4 / 6, abs=1e-4)
    assert prefix_share([[]], [[]]) == 1.0
    assert prefix_share([[9]], [[1, 2]]) == 0.0
