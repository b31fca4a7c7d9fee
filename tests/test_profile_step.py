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


def test_steps_with_the_refresh_range_are_the_refresh_steps(prof):
    """A step is a refresh step when the refresh forward's profiler range starts inside it (either
    route: the paged one launches about a decode step's kernels, so counting kernels cannot tell);
    the summary gives their p50s beside the decode steps'."""
    from vllm_odb.engine import REFRESH_MARK

    def ev(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = []
    for i in range(4):  # steps of 100 us; step 2 refreshes (two kernels more, longer)
        events += [ev("user_annotation", f"engine_step_{i}", 100 * i, 100), ev("kernel", "nvjet_gemm", 100 * i + 5, 10)]
    events += [ev("user_annotation", REFRESH_MARK, 220, 50), ev("kernel", "nvjet_gemm", 230, 30),
               ev("kernel", "nvjet_gemm", 262, 30)]
    res = prof.analyse({"traceEvents": events}, [(100 * i, 100 * i + 100) for i in range(4)])
    assert [s["refresh"] for s in res["steps"]] == [False, False, True, False]
    summary = prof._summary(res, [0.1] * 4, 0.005)
    assert summary["decode_steps"] == 3 and summary["refresh_steps"] == 1
    assert summary["refresh_kernels_p50"] == 3 and summary["refresh_matmul_ms_p50"] == pytest.approx(0.07)
    # the refresh steps' own kernels and gaps (what an ALP refresh spends beyond the forward)
    assert res["refresh_top_kernels_ms"] == [{"name": "nvjet_gemm", "ms_total": 0.07}]
    assert summary["refresh_idle_before_ms_p50"] == pytest.approx(0.005)
    assert summary["refresh_idle_between_ms_p50"] == pytest.approx(0.017)


def test_a_profile_without_kernels_is_refused_by_name(prof):
    """A profile whose steps ran nothing (the request finished before them) says so, instead of
    statistics' 'no mode for empty data' (what the jump-share profile hit on the H200)."""
    steps = {"steps": [{"kernels": 0, "wall_ms": 1.0}] * 3}
    with pytest.raises(SystemExit, match="none of the 3 profiled steps launched a GPU kernel"):
        prof._summary(steps, [1.0], 3.5)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_profiled_steps_always_have_batch_requests(prof, monkeypatch, batch):
    """``_engine``'s step function adds a request whenever one has finished, so a jump-share engine
    that finishes its requests early still profiles decode steps of ``--batch`` requests."""
    import types

    class Engine:
        def __init__(self):
            self.left, self.added, self.steps, self.widths = {}, [], 0, []

        def has_unfinished_requests(self):
            return bool(self.left)

        def add_request(self, rid, prompt, sp):
            self.added.append(rid)
            self.left[rid] = 3  # finishes after three steps

        def step(self):
            self.steps += 1
            self.widths.append(len(self.left))
            outs = []
            for rid in list(self.left):
                self.left[rid] -= 1
                outs.append(types.SimpleNamespace(request_id=rid, finished=self.left[rid] == 0))
                if self.left[rid] == 0:
                    del self.left[rid]
            return outs

    engine = Engine()

    class LLM:
        def __init__(self, **kw):
            assert kw["max_num_seqs"] >= batch
            self.llm_engine = engine

        def generate(self, *a, **k):
            return []

    fake_vllm = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **k: k)
    monkeypatch.setitem(__import__("sys").modules, "vllm", fake_vllm)
    monkeypatch.setitem(__import__("sys").modules, "vllm.inputs",
                        types.SimpleNamespace(TokensPrompt=lambda **k: k))
    args = types.SimpleNamespace(model="llada-8b", speculative=True, prompt_len=8, gen_length=16, block_length=8,
                                 skip=7, engine_args={}, batch=batch, method=None, traces=None)
    spec = types.SimpleNamespace(mask_token_id=100)
    got, step = prof._engine(args, spec)
    assert got is engine and engine.steps == 7 and len(engine.added) == 3 * batch
    for _ in range(5):
        step()
    assert engine.steps == 12 and len(engine.added) == 4 * batch and len(set(engine.added)) == 4 * batch
    assert engine.widths == [batch] * 12


def _fake_vllm(monkeypatch, made: list):
    import types

    class LLM:
        def __init__(self, **kw):
            made.append(kw)
            # every request ends in the step after it was added
            self.llm_engine = types.SimpleNamespace(add_request=lambda *a: made.append(a), step=lambda: [
                types.SimpleNamespace(request_id=a[0], finished=True) for a in made[-1:] if isinstance(a, tuple)])

        def generate(self, *a, **k):
            return []

    monkeypatch.setitem(__import__("sys").modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **k: k))
    monkeypatch.setitem(__import__("sys").modules, "vllm.inputs", types.SimpleNamespace(TokensPrompt=lambda **k: k))


def test_traces_replay_their_requests_with_the_method_named(prof, monkeypatch, tmp_path):
    """``--traces`` profiles replayed requests (bench speed's format): each request names
    ``--method`` and carries its trace's replay, prompts of the traced lengths, so refreshes and
    ALP's cuts happen as traced; a missing method or gen length is refused by name."""
    import json
    import types

    replay = [{"r": 1}, {"r": 2}]
    (tmp_path / "t.json").write_text(json.dumps({"traces": {"odb-alp|64|vllm": [
        {"prompt_len": 5, "response_tokens": 9, "replay": replay[0]},
        {"prompt_len": 7, "response_tokens": 3, "replay": replay[1]}]}}))
    made: list = []
    _fake_vllm(monkeypatch, made)
    spec = types.SimpleNamespace(mask_token_id=100, eos_token_id=99)
    args = types.SimpleNamespace(model="llada-8b", speculative=False, prompt_len=8, gen_length=64, block_length=8,
                                 skip=3, engine_args={}, batch=1, method="odb-alp", traces=str(tmp_path / "t.json"))
    prof._engine(args, spec)
    added = [a for a in made if isinstance(a, tuple)]
    assert [len(a[1]["prompt_token_ids"]) for a in added] == [5, 7, 5]
    assert [a[2]["extra_args"] for a in added] == [{"method": "odb-alp", "replay": r} for r in replay + replay[:1]]
    assert all(a[2]["stop_token_ids"] == [99] for a in added)
    assert made[0]["max_model_len"] == 7 + 64 + 64
    args.method = "fast-dllm"
    with pytest.raises(SystemExit, match="no 'fast-dllm|64|vllm'"):
        prof._engine(args, spec)
    args.method, args.traces = "odb", None
    with pytest.raises(SystemExit, match="--method odb needs --speculative"):
        prof._engine(args, spec)


def test_engine_args_reach_the_profiled_engine_as_json(prof):
    """``--engine-args`` (e.g. another attention backend) is a JSON object, checked before any engine
    starts, as bench speed's."""
    import argparse

    ap = argparse.ArgumentParser()
    prof.add_arguments(ap)
    args = ap.parse_args(["--model", "llada-8b", "--out", "x", "--engine-args", '{"attention_backend": "FLASH_ATTN"}'])
    assert args.engine_args == {"attention_backend": "FLASH_ATTN"}
    assert ap.parse_args(["--model", "llada-8b", "--out", "x"]).engine_args == {}
    with pytest.raises(SystemExit):
        ap.parse_args(["--model", "llada-8b", "--out", "x", "--engine-args", "[1]"])


def test_batch_below_one_is_refused_by_name(prof):
    import argparse

    ap = argparse.ArgumentParser()
    prof.add_arguments(ap)
    args = ap.parse_args(["--model", "llada-8b", "--out", "x.json", "--batch", "0"])
    with pytest.raises(SystemExit, match="--batch 0"):
        prof.main(args)


def test_decode_steps_are_the_steps_near_the_median_kernel_count(prof):
    """Overlapped steps' kernel counts spread by a few percent (483-513 on the H200): every step
    within 15% of the median of the steps without a refresh counts, not only the most common count
    (which kept 2 steps of 24); a step far off (a block's first plan, a refresh) does not."""
    steps = [{"kernels": k, "wall_ms": 5.0, "gpu_busy_ms": 4.0, "matmul_ms": 3.0, "attention_ms": 0.5,
              "other_ms": 0.5, "idle_before_ms": 0.0, "idle_between_ms": 0.3, "idle_after_ms": 0.0,
              "refresh": k == 794} for k in (794, 200, 676, 483, 496, 499, 494, 504, 486, 501, 502)]
    summary = prof._summary({"steps": steps}, [5.0], 3.5)
    assert summary["decode_steps"] == 8 and summary["refresh_steps"] == 1
