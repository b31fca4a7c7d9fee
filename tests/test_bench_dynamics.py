"""``bench dynamics`` and ``bench traces`` (how a checkpoint decodes, recorded for replay), the
suite registry, and ``bench speed``'s shipped default traces."""

from __future__ import annotations

import json

import pytest

from vllm_odb.bench import dynamics, speed
from vllm_odb.bench.__main__ import main
from vllm_odb.policies import DecodeConfig
from vllm_odb.tiny import suites


def _record(response, commits, task="", **stats):
    from types import SimpleNamespace

    return {"example": SimpleNamespace(task=task), "response": response, "nfe": sum(map(len, commits)), "check": {"final": True, "steps": response > 40},
            "trace": {"commits": commits, "lengths": [0] * len(commits)}, **stats}


def test_trace_metrics_count_content_blocks_first_forwards_and_eos_fill():
    # block 8: response 10 tokens -> blocks 0 and 1 hold response (content), the end marker in block 1,
    # blocks 2, 3 are EOS fill.
    r = _record(10, [[2, 1, 1, 4], [1, 7], [8], [3, 5]])
    m = dynamics.trace_metrics([r], 8)
    assert m["first_forward_share"] == pytest.approx((2 / 8 + 1 / 8) / 2)
    assert m["forwards_per_content_block"] == 3
    assert m["single_token_forwards"] == pytest.approx(3 / 6)
    assert m["eos_blocks_in_one_forward"] == 0.5
    assert m["nfe_es"] == 6  # forwards up to the block holding the end marker


def test_method_metrics_alp_and_jump_fields():
    cfg = DecodeConfig.for_method("odb", gen_length=64, block_length=8)
    recs = [_record(30, [[4] * 8], canvas_length=32, drafted_accepted=6, cached_forwards=3),
            _record(50, [[4] * 8] * 2, canvas_length=48, drafted_accepted=0, cached_forwards=3),
            _record(60, [[8]] * 8, canvas_length=64, drafted_accepted=0, cached_forwards=0)]
    m = dynamics.method_metrics(recs, cfg, {0: 20, 1: 60, 2: 60})
    assert m["accuracy"] == pytest.approx(2 / 3) and m["final_accuracy"] == 1.0
    assert m["tokens_per_forward"] == pytest.approx(140 / (8 + 16 + 8))
    assert m["alp_cut_share"] == pytest.approx(2 / 3)
    assert m["alp_truncated_share"] == pytest.approx(1 / 3)  # the 50-token answer ran into its 48 cut
    assert m["alp_cut_inside_fast_dllm_answer"] == pytest.approx(1 / 3)
    assert m["drafted_per_forward"] == 1.0
    assert "accuracy_by_task" not in m  # records whose examples name no task


def test_method_metrics_accuracy_by_task():
    cfg = DecodeConfig.for_method("fast-dllm", gen_length=64, block_length=8)
    recs = [_record(30, [[8]], task="sort"), _record(50, [[8]], task="sort"), _record(50, [[8]], task="chain")]
    assert dynamics.method_metrics(recs, cfg, None)["accuracy_by_task"] == {"chain": 1.0, "sort": 0.5}


def test_method_names_take_a_threshold():
    got = dynamics.parse_methods("fast-dllm,odb@1.0,vanilla", 0.9, 64, 32)
    assert [n for n, _ in got] == ["fast-dllm", "odb@1.0", "vanilla"]
    assert got[0][1].threshold == 0.9 and got[1][1].threshold == 1.0 and got[1][1].jump
    for bad, msg in (("nope", "unknown method"), ("odb@x", "threshold"), ("odb/rx", "draft budget"), ("odb/r", "draft budget"),
                     ("fast-dllm/r96", "drafts nothing")):
        with pytest.raises(ValueError, match=msg):
            dynamics.parse_methods(bad, 0.9, 64, 32)


def test_jump_methods_take_a_draft_budget():
    got = dict(dynamics.parse_methods("odb,odb/r96,odb@1.0/r128", 0.9, 64, 32))
    assert got["odb"].ridge_rows == DecodeConfig().ridge_rows
    assert (got["odb/r96"].ridge_rows, got["odb/r96"].threshold) == (96, 0.9)
    assert (got["odb@1.0/r128"].ridge_rows, got["odb@1.0/r128"].threshold) == (128, 1.0)


def test_suite_registry_reads_the_training_log(tmp_path):
    (tmp_path / "training_log.json").write_text(json.dumps({"args": {"steps": 3}}))
    assert suites.suite_name(str(tmp_path)) == "basic"  # trained before the log named it
    assert suites.suite_name(str(tmp_path / "nowhere")) == "basic"
    (tmp_path / "training_log.json").write_text(json.dumps({"args": {"suite": "worked"}}))
    assert suites.for_checkpoint(str(tmp_path)).__name__ == "vllm_odb.tiny.worked"
    (tmp_path / "training_log.json").write_text("{broken")
    assert suites.suite_name(str(tmp_path)) == "basic"
    with pytest.raises(ValueError, match="unknown suite"):
        suites.get("poetry")


def test_dynamics_command(tmp_path, capsys):
    out = tmp_path / "d.json"
    assert main(["dynamics", "--model", "checkpoints/tiny-dream", "--methods", "fast-dllm,odb-alp", "--limit", "4",
                 "--gen-length", "64", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| fast-dllm |" in table and "| odb-alp |" in table
    res = json.loads(out.read_text())["methods"]
    assert res["fast-dllm"]["requests"] == 4 and "alp_canvas_mean" in res["odb-alp"]
    assert main(["dynamics", "--model", "checkpoints/tiny-dream", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_traces_record_both_engines_and_record_once_when_both_stop_early(tmp_path):
    out = tmp_path / "t.json"
    assert main(["traces", "--model", "checkpoints/tiny-llada", "--methods", "fast-dllm,odb-alp,odb",
                 "--gen-lengths", "64", "--requests", "3", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    tr = data["traces"]
    assert set(tr) == {f"{m}|64|{e}" for m in ("fast-dllm", "odb-alp", "odb") for e in ("reference", "vllm")}
    assert all(len(v) == 3 for v in tr.values())
    assert tr["odb-alp|64|reference"] == tr["odb-alp|64|vllm"]  # early stop on both engines
    for ref, eng in zip(tr["fast-dllm|64|reference"], tr["fast-dllm|64|vllm"]):  # the engine stops at the end
        assert len(eng["replay"]["commits"]) <= len(ref["replay"]["commits"]) == 2
    # The speed benchmark reads them (and refuses a shipped default that lacks a row's traces).
    speed.check_default_traces(str(out), "vllm", ["fast-dllm", "odb"], [64], 3)
    with pytest.raises(ValueError, match="lacks"):
        speed.check_default_traces(str(out), "vllm", ["fast-dllm"], [64, 128], 3)
    assert main(["traces", "--model", "checkpoints/tiny-llada", "--methods", "nope", "--out", str(out)]) == 2


def test_speed_reads_the_shipped_traces_of_a_full_size_model_by_default(tmp_path, monkeypatch, capsys):
    """With no --traces and no --trace-model, a full-size row replays the shipped traces when they
    exist, read only: a row they cannot serve is an error naming the command, before any model loads."""
    shipped = tmp_path / "tiny-llada.json"
    shipped.write_text(json.dumps({"trace_model": "checkpoints/tiny-llada",
                                   "traces": {"fast-dllm|256|reference": [{"prompt_len": 3}]}}))
    monkeypatch.setitem(speed.DEFAULT_TRACES, "llada-8b", str(shipped))
    argv = ["speed", "--engine", "reference", "--model", "llada-8b", "--methods", "fast-dllm", "--gen-lengths",
            "256", "--batches", "1", "--requests", "2", "--out", str(tmp_path / "o.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(shipped) in err and "fast-dllm|256|reference" in err and "bench traces" in err
    assert json.loads(shipped.read_text())["traces"]["fast-dllm|256|reference"] == [{"prompt_len": 3}]  # untouched
