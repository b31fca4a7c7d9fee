"""``bench profile-decode-step``'s trace analysis (vllm_odb/bench/profile_decode.py; the numbers
BENCHMARKS.md's per-step profile reports), on a hand-made chrome trace."""

from __future__ import annotations

import pytest

from vllm_odb.bench import profile_decode


@pytest.fixture(scope="module")
def prof():
    return profile_decode


def test_union_merges_overlaps_and_keeps_gaps(prof):
    assert prof.union_ms([(0, 1000), (500, 1500), (3000, 4000)]) == pytest.approx(2.5)
    assert prof.union_ms([]) == 0.0


def test_kernel_kinds(prof):
    assert prof.kind_of("nvjet_sm90_tst_192x32_64x7_2x1_v_bz_TNT") == "matmul"
    assert prof.kind_of("kernel_unified_attention") == "attention"
    assert prof.kind_of("triton_red_fused_fused_add_rms_norm_0") == "other"


def test_step_split_into_busy_and_idle_before_between_after(prof):
    def ev(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        ev("user_annotation", "engine_step_0", 0, 100),
        ev("kernel", "nvjet_gemm", 10, 20),          # busy 10..30
        ev("kernel", "kernel_unified_attention", 25, 15),  # overlaps: busy to 40
        ev("gpu_memcpy", "Memcpy HtoD", 60, 10),      # gap 40..60, busy 60..70
        ev("cpu_op", "aten::copy_", 5, 3),
        ev("kernel", "nvjet_gemm", 150, 10),          # outside the step
    ]}
    res = prof.analyse(trace, [(0, 100)])
    (step,) = res["steps"]
    assert step["wall_ms"] == pytest.approx(0.1)
    assert step["gpu_busy_ms"] == pytest.approx(0.04)
    assert step["idle_before_ms"] == pytest.approx(0.01)
    assert step["idle_between_ms"] == pytest.approx(0.02)
    assert step["idle_after_ms"] == pytest.approx(0.03)
    assert step["kernels"] == 3
    assert step["matmul_ms"] == pytest.approx(0.02) and step["attention_ms"] == pytest.approx(0.015)
    assert step["other_ms"] == pytest.approx(0.01)  # the memcpy
    assert res["top_host_ops_ms"] == [{"name": "aten::copy_", "ms_total": 0.003}]
