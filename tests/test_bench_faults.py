"""``bench server-faults``' pure parts (vllm_odb/bench/fault_check.py) on CPU: its requests and
faulted copies, what counts as ending with an error, and the judgement of the requests phase."""

from __future__ import annotations

from pathlib import Path

from vllm_odb.bench import fault_check

ROOT = Path(__file__).resolve().parents[1]


def test_requests_and_faulted_copies():
    plan = fault_check.fault_requests(12, 24, True, str(ROOT / "checkpoints" / "tiny-llada"))
    assert len(plan) == 12 and {r["api"] for r in plan} == {"chat", "completions"}
    assert {r["method"] for r in plan} == {"fast-dllm", "odb-alp"}  # no drafts: batch-independent answers
    assert {r["stream"] for r in plan} == {True, False}
    assert all(r["ids"] for r in plan if r["api"] == "completions")
    faulted = fault_check.faulted_copies(plan, True)
    assert {r["method"] for r in faulted[1::2]} == {"odb"}
    assert "odb" not in {r["method"] for r in fault_check.faulted_copies(plan, False)}
    assert [r["fault"] for r in faulted] == [f for f, _ in fault_check.FAULTS]
    assert [r["i"] for r in faulted] == list(range(12, 12 + len(faulted)))
    assert all(r["xargs"] == {"debug_fault": r["fault"]} for r in faulted)
    assert {int(r["fault"].split("@")[1]) <= fault_check.EARLY for r in faulted} == {True, False}


def test_ended_with_error():
    assert fault_check.ended_with_error({"status": 500, "error": "Internal server error"})
    assert not fault_check.ended_with_error({"status": 200, "done": True, "text": "x"})
    assert not fault_check.ended_with_error({"status": 400, "error": "bad"})
    assert not fault_check.ended_with_error({"status": 0, "timeout": True})


def _run(plan, faulted, **override):
    ok = {"status": 200, "done": True}
    baseline = [{**ok, "text": f"a{r['i']}"} for r in plan]
    run = [dict(b) for b in baseline] + [{"status": 500, "error": "Internal server error"} for _ in faulted]
    for i, got in override.items():
        run[int(i[1:])] = got
    return fault_check.judge_requests(plan, faulted, baseline, run)


def test_judge_requests():
    plan = [{"i": i, "prompt": i, "method": "fast-dllm"} for i in range(4)]
    faulted = [{"i": 4, "prompt": 0, "fault": "nan@1", "method": "fast-dllm"},
               {"i": 5, "prompt": 1, "fault": "raise@6", "method": "fast-dllm"}]
    assert _run(plan, faulted) == []
    # another request's answer changed beside the faulted ones
    assert _run(plan, faulted, r2={"status": 200, "done": True, "text": "zz"}) == [
        "request 2 beside the faulted ones: 200, text differs"]
    # an early fault that did not end with an error
    assert _run(plan, faulted, r4={"status": 200, "done": True, "text": "a0"}) == [
        "faulted request 4 (nan@1) did not end with an error: 200"]
    # a late fault whose forward never came: its baseline answer is fine, another is not
    assert _run(plan, faulted, r5={"status": 200, "done": True, "text": "a1"}) == []
    assert _run(plan, faulted, r5={"status": 200, "done": True, "text": "??"}) == [
        "faulted request 5 (raise@6) completed with another answer"]
    assert _run(plan, faulted, r5={"status": 0, "timeout": True}) == ["faulted request 5 (raise@6): no answer"]
    assert _run(plan, faulted, r5={"status": 400, "error": "x"}) == ["faulted request 5 (raise@6) ended with 400"]
    faulted[1]["method"] = "odb"  # a drafting request's answer may differ across batches
    assert _run(plan, faulted, r5={"status": 200, "done": True, "text": "??"}) == []
