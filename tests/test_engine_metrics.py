"""dLLM metrics (engine/metrics.py): per-request counters -> engine file -> Prometheus collector."""

from __future__ import annotations

import json
import types

import pytest

from vllm_odb.engine import metrics
from vllm_odb.engine.metrics import COUNTERS, ODBCollector, RequestCounters, snapshot
from vllm_odb.engine.requests import RequestTable
from vllm_odb.policies import DecodeConfig

MASK, EOS = 9, 8


@pytest.fixture
def mdir(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.ENV, str(tmp_path))
    return tmp_path


def _params(**kw):
    return types.SimpleNamespace(temperature=0.0, max_tokens=20, extra_args=None, **kw)


def _table(counters):
    engine = DecodeConfig(gen_length=32, block_length=16)
    return RequestTable(4, 128, engine, 0, mask_id=MASK, eos_id=EOS, markers=[], device="cpu", counters=counters)


def test_counters_are_written_and_summed_over_engines(mdir):
    a, b = RequestCounters(), RequestCounters()
    b._path = mdir / "engine-other.json"  # a second engine process
    a.add({"forwards": 3, "tokens": 32, "canvas_requested": 64, "canvas_predicted": 32})
    b.add({"forwards": 5, "tokens": 16, "canvas_requested": 64, "canvas_predicted": 64})
    a.flush(force=True)
    b.flush(force=True)
    total = snapshot()
    assert (total["requests"], total["forwards"], total["tokens"]) == (2, 8, 48)
    assert (total["canvas_requested"], total["canvas_predicted"]) == (128, 96)


def test_flush_is_throttled_but_forced_writes_land(mdir):
    c = RequestCounters()
    c.add({"forwards": 1})
    c.flush()
    c.add({"forwards": 1})
    c.flush()  # within a second of the last write: skipped
    assert json.loads(c._path.read_text())["forwards"] == 1
    c.flush(force=True)
    assert json.loads(c._path.read_text())["forwards"] == 2


def test_disabled_counters_write_nothing(mdir):
    c = RequestCounters(enabled=False)
    c.add({"forwards": 1})
    c.flush(force=True)
    assert list(mdir.iterdir()) == []


def test_unreadable_files_are_skipped(mdir):
    (mdir / "engine-1.json").write_text("{half")
    (mdir / "engine-2.json").write_text(json.dumps({"forwards": 4}))
    assert snapshot()["forwards"] == 4


def test_snapshot_without_directory_is_zero(monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    assert snapshot() == dict.fromkeys(COUNTERS, 0)


def test_collector_exports_counters_and_ratios(mdir):
    c = RequestCounters()
    c.add({"forwards": 6, "idle_forwards": 2, "tokens": 32, "canvas_requested": 64, "canvas_predicted": 32})
    c.flush(force=True)
    fams = {f.name: f for f in ODBCollector().collect()}
    assert {f"vllm_odb:{k}" for k in COUNTERS} <= set(fams)
    assert fams["vllm_odb:forwards"].samples[0].value == 6
    assert fams["vllm_odb:tokens_per_forward"].samples[0].value == 32 / 8
    assert fams["vllm_odb:predicted_length_ratio"].samples[0].value == 0.5


def test_collector_text_exposition(mdir):
    from prometheus_client import CollectorRegistry, generate_latest

    RequestCounters().add({"forwards": 1})
    reg = CollectorRegistry()
    reg.register(ODBCollector())
    text = generate_latest(reg).decode()
    assert "vllm_odb:forwards_total" in text and "vllm_odb:tokens_per_forward" in text


def test_table_counts_a_request_when_it_ends(mdir):
    counters = RequestCounters()
    table = _table(counters)
    req = table.add(0, "a", [1, 2, 3], None, _params())
    req.stats["forwards"] += 4
    req.stats["tokens"] += 16
    table.remove("a")
    assert counters.totals["requests"] == 1
    assert (counters.totals["forwards"], counters.totals["tokens"]) == (4, 16)
    assert counters.totals["canvas_requested"] == counters.totals["canvas_predicted"] == 32


def test_table_does_not_count_warmup(mdir):
    counters = RequestCounters()
    table = _table(counters)
    table.add(0, "_warmup_0", [1, 2, 3], None, _params())
    table.remove("_warmup_0")
    assert counters.totals["requests"] == 0


def test_metrics_dir_created_once_and_inherited(monkeypatch):
    monkeypatch.delenv(metrics.ENV, raising=False)
    monkeypatch.setattr(metrics, "_own_dir", None)
    first = metrics.metrics_dir(create=True)
    assert first.is_dir() and metrics.metrics_dir(create=True) == first


def test_table_counts_a_finished_request_once(mdir):
    counters = RequestCounters()
    table = _table(counters)
    req = table.add(0, "a", [1, 2, 3], None, _params())
    req.stats["forwards"] = 2
    table.finish(0)
    req.stats["idle_forwards"] += 1  # the EOS-commit step after the finish is not counted
    table.remove("a")
    assert (counters.totals["requests"], counters.totals["forwards"], counters.totals["idle_forwards"]) == (1, 2, 0)


def test_table_idle_when_every_request_finished(mdir):
    table = _table(RequestCounters())
    table.add(0, "a", [1, 2, 3], None, _params())
    assert not table.idle()
    table.finish(0)
    assert table.idle()
