"""``python -m vllm_odb.bench speed`` on CPU: reference-engine rows on a tiny checkpoint, and the
trace-replay path on a random-weight model (a tiny-shaped stand-in for the full-size configs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_odb.bench import full_size, speed
from vllm_odb.bench.__main__ import main

from shipped import ANSWER_GEN

KEYS = {"method", "engine", "model", "replay", "trace_model", "gen_length", "batch", "requests", "tokens_per_s",
        "latency_p50_s", "latency_p90_s", "nfe", "tokens_per_forward", "refresh_tokens", "gpu_mem_gb"}


def test_reference_rows_on_the_tiny_checkpoint(tmp_path):
    out = tmp_path / "speed.json"
    gen = str(ANSWER_GEN)  # a canvas the answers end in, so ALP has a cut to make
    assert main(["speed", "--engine", "reference", "--model", "checkpoints/tiny-llada", "--methods", "fast-dllm,odb",
                 "--gen-lengths", gen, "--batches", "1,2", "--requests", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and all(KEYS <= set(r) for r in data["rows"])
    by = {(r["method"], r["batch"]): r for r in data["rows"]}
    assert by[("odb", 1)]["refresh_tokens"] < by[("fast-dllm", 1)]["refresh_tokens"]  # ALP cut the canvas
    assert all(not r["replay"] for r in data["rows"])
    assert data["meta"]["commands"][0].startswith("python -m vllm_odb.bench speed")
    # The calibrated reference by default; jump-share (odb) has no research-code layout.
    assert by[("fast-dllm", 1)]["attention_impl"] == "research" and by[("odb", 1)]["attention_impl"] == "plain"
    assert main(["speed", "--engine", "reference", "--model", "checkpoints/tiny-llada", "--methods", "fast-dllm",
                 "--gen-lengths", gen, "--batches", "1", "--requests", "2", "--reference-impl", "plain",
                 "--out", str(out)]) == 0
    one = by[("fast-dllm", 1)]  # batch-1 rows list each request, in order
    assert len(one["request_latency_s"]) == len(one["request_tokens"]) == one["requests"] == 2
    assert sum(one["request_tokens"]) == one["response_tokens"] and "request_tokens" not in by[("fast-dllm", 2)]
    plain = json.loads(out.read_text())["rows"][-1]
    assert plain["attention_impl"] == "plain"
    assert (plain["nfe"], plain["refresh_tokens"]) == (by[("fast-dllm", 1)]["nfe"], by[("fast-dllm", 1)]["refresh_tokens"])


def test_replay_rows_make_the_traced_forwards(tmp_path, monkeypatch):
    cfg = json.loads(open("checkpoints/tiny-dream/config.json").read())
    monkeypatch.setitem(full_size.FULL_SIZE, "big-dream", lambda: cfg)
    monkeypatch.setitem(speed.FULL_SIZE_TRACES, "big-dream", "checkpoints/tiny-dream")
    out, traces = tmp_path / "speed.json", tmp_path / "traces.json"
    argv = ["speed", "--engine", "reference", "--model", "big-dream", "--methods", "fast-dllm,odb", "--gen-lengths",
            "64", "--batches", "1", "--requests", "2", "--threshold", "0.999", "--dtype", "float32",
            "--traces", str(traces), "--out", str(out)]
    assert main(argv) == 0
    recorded = json.loads(traces.read_text())
    assert set(recorded["traces"]) == {"fast-dllm|64|reference", "odb|64|reference"}
    tiny = json.loads(out.read_text())["rows"]
    assert main(argv) == 0  # traces read back; rows appended
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["replay"] and r["trace_model"] == "tiny-dream" for r in rows)
    for a, b in zip(tiny, rows[2:]):  # the same forwards both times
        assert (a["nfe"], a["refresh_tokens"], a["tokens_per_forward"]) == (b["nfe"], b["refresh_tokens"],
                                                                             b["tokens_per_forward"])
    fd = [t["replay"] for t in recorded["traces"]["fast-dllm|64|reference"]]
    assert rows[0]["nfe"] == sum(len(c) for t in fd for c in t["commits"]) / len(fd)
    assert "roofline_s" not in rows[0]  # no ceilings measured (no GPU): no roofline


def test_rows_record_their_roofline(tmp_path, monkeypatch):
    """With this run's ceilings, each row records the roofline of the forwards its requests made
    (bench/roofline.py over the traces it ran), for the reference engine's own dynamics too."""
    from types import SimpleNamespace

    from vllm_odb.bench import ceilings
    from vllm_odb.bench.roofline import row_seconds
    from vllm_odb.checkpoint import ModelSpec

    monkeypatch.setattr(ceilings, "CEILINGS", {"bf16_matmul_tflops": 100.0, "copy_bandwidth_gbs": 1000.0})
    cfg = json.loads(Path("checkpoints/tiny-dream/config.json").read_text())
    monkeypatch.setitem(full_size.FULL_SIZE, "big-dream", lambda: cfg)
    monkeypatch.setitem(speed.FULL_SIZE_TRACES, "big-dream", "checkpoints/tiny-dream")
    out, traces = tmp_path / "speed.json", tmp_path / "traces.json"
    assert main(["speed", "--engine", "reference", "--model", "big-dream", "--methods", "fast-dllm,odb", "--gen-lengths",
                 "64", "--batches", "1,2", "--requests", "2", "--dtype", "float32", "--traces", str(traces),
                 "--out", str(out)]) == 0
    data, recorded = json.loads(out.read_text()), json.loads(traces.read_text())["traces"]
    assert data["meta"]["ceilings"] == ceilings.CEILINGS and len(data["rows"]) == 4
    spec = ModelSpec.from_config(cfg)
    for row in data["rows"]:
        knobs = SimpleNamespace(block_length=32, threshold=0.9, ridge_rows=None)
        ran = recorded[f"{row['method']}|64|reference"][:row["requests"]]
        want = row_seconds(ran, spec, speed.method_config(row["method"], 64, knobs), "reference", row["batch"],
                           100.0, 1000.0)
        assert (row["roofline_s"], row["roofline_forwards"]) == (pytest.approx(want[0], rel=1e-4), want[1])
        assert row["roofline_ceilings"] == ceilings.CEILINGS and want[1] >= row["nfe"]


@pytest.mark.parametrize("argv,msg", [
    (["--methods", "nope"], "--methods: unknown"),
    (["--gen-lengths", "64,x"], "--gen-lengths"),
    (["--batches", "0"], "--batches"),
    (["--model", "nowhere"], "a checkpoint directory or one of"),
    (["--gen-lengths", "60"], "not a multiple of block_length"),
])
def test_bad_arguments_name_the_knob(tmp_path, capsys, argv, msg):
    base = {"--engine": "reference", "--model": "checkpoints/tiny-llada", "--out": str(tmp_path / "o.json")}
    for k, v in zip(argv[::2], argv[1::2]):
        base[k] = v
    assert main(["speed", *[x for kv in base.items() for x in kv]]) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("value,msg", [("{bad", "not JSON"), ("[1]", "a JSON object")])
def test_engine_args_must_be_a_json_object(tmp_path, capsys, value, msg):
    with pytest.raises(SystemExit) as e:
        main(["speed", "--engine", "vllm", "--model", "llada-8b", "--out", str(tmp_path / "o.json"),
              "--engine-args", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--engine-args" in err and msg in err


def test_a_row_with_too_few_traces_is_skipped_out_loud(capsys):
    """A batch row needs as many traced requests as its batch: with fewer it is skipped, and the
    run says which row and how many traces it would need; with enough, it runs silently."""
    from vllm_odb.bench.speed import enough_traces

    assert enough_traces([{}] * 64, "odb", 1024, 64, "vllm") and not capsys.readouterr().err
    assert not enough_traces([{}] * 12, "odb", 1024, 64, "vllm")
    err = capsys.readouterr().err
    assert "odb gen 1024 batch 64 (vllm) skipped" in err and "hold 12 requests" in err and "--requests 64" in err


def test_a_jump_row_where_no_draft_fits_replays_its_plain_twin():
    """A jump-share trace holds the drafts accepted alone; a replay forces those commits whatever the
    step laid out. Where the batch's share of the draft budget is the window no draft fits and the
    engine decodes as odb-alp: that row replays odb-alp's traces, and says so. Where drafts fit
    but fewer than alone, the row says its drafts are an upper bound; batch 1 is exact."""
    import types

    from vllm_odb.bench.speed import replay_method

    args = types.SimpleNamespace(block_length=32, threshold=0.9, ridge_rows=178)
    traces = {"odb|1024|vllm": [], "odb-alp|1024|vllm": []}
    assert replay_method("odb", 1024, 1, args, 0, traces, "vllm") == ("odb", "")
    method, note = replay_method("odb", 1024, 2, args, 0, traces, "vllm")  # 89 rows each: drafts fit
    assert method == "odb" and "upper bound" in note
    method, note = replay_method("odb", 1024, 8, args, 0, traces, "vllm")  # 178 // 8 = 22 < 32: the window
    assert method == "odb-alp" and "no draft fits at batch 8" in note
    method, note = replay_method("odb", 1024, 64, args, 0, {"odb|1024|vllm": []}, "vllm")  # no twin traces
    assert method == "odb" and "overstated" in note
    assert replay_method("odb-alp", 1024, 64, args, 0, traces, "vllm") == ("odb-alp", "")
    assert replay_method("odb", 1024, 8, args, 1, traces, "vllm")[0] == "odb-alp"  # Dream: 2*22-33 < 33


def test_step_split_says_which_steps_the_wall_went_to(tmp_path):
    """Per request: decode steps, steps with a refresh, steps that did neither, and the wall no step
    covers (the step after a request ended has no previous step: untimed)."""
    import json

    from vllm_odb.bench.speed import step_split

    lines = [{"step_s": None, "decode_reqs": 0, "refresh_reqs": 1},
             {"step_s": 0.005, "decode_reqs": 1, "refresh_reqs": 0},
             {"step_s": 0.005, "decode_reqs": 1, "refresh_reqs": 0},
             {"step_s": 0.030, "decode_reqs": 1, "refresh_reqs": 1},
             {"step_s": 0.004, "decode_reqs": 0, "refresh_reqs": 0}]
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = step_split(str(path), 2, 0.1)
    assert got["steps_per_request"] == 2.5
    assert got["decode_s_per_request"] == 0.005 and got["decode_steps_per_request"] == 1.0
    assert got["refresh_step_s_per_request"] == 0.015 and got["refresh_step_steps_per_request"] == 0.5
    assert got["idle_s_per_request"] == 0.002 and got["idle_steps_per_request"] == 0.5
    assert got["untimed_s_per_request"] == 0.028


def test_step_split_counts_the_allocators_retries_and_mallocs_per_request(tmp_path):
    """The step profiler's allocator counters (a GPU's; absent on the CPU) summed per request, in
    all steps and in the steps with a refresh: a retry is a device sync inside a step."""
    import json

    from vllm_odb.bench.speed import step_split

    lines = [{"step_s": 0.005, "decode_reqs": 1, "refresh_reqs": 0, "alloc_retries": 0, "device_mallocs": 1},
             {"step_s": 0.030, "decode_reqs": 1, "refresh_reqs": 1, "alloc_retries": 3, "device_mallocs": 4},
             {"step_s": 0.005, "decode_reqs": 1, "refresh_reqs": 0, "alloc_retries": 1, "device_mallocs": 0}]
    path = tmp_path / "steps.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    got = step_split(str(path), 2, 0.1)
    assert got["alloc_retries_per_request"] == 2.0 and got["refresh_step_alloc_retries_per_request"] == 1.5
    assert got["device_mallocs_per_request"] == 2.5 and got["refresh_step_device_mallocs_per_request"] == 2.0
    path.write_text("\n".join(json.dumps({k: v for k, v in x.items() if k not in ("alloc_retries", "device_mallocs")})
                              for x in lines) + "\n")
    assert not any("alloc" in k for k in step_split(str(path), 2, 0.1))  # a CPU profile: no such keys


def test_step_profiler_writes_the_allocators_counts_as_deltas(tmp_path, monkeypatch):
    """Each step's line carries the allocator counters' change since the previous step."""
    import json
    from types import SimpleNamespace

    from vllm_odb.bench import profile

    counts = iter([{"alloc_retries": 5, "device_mallocs": 10}, {"alloc_retries": 7, "device_mallocs": 10},
                   {"alloc_retries": 7, "device_mallocs": 13}])
    monkeypatch.setattr(profile, "allocator_counts", lambda: next(counts))
    prof = profile.StepProfiler(str(tmp_path / "steps.jsonl"))
    report = SimpleNamespace(input_batch=SimpleNamespace(num_tokens=32, num_reqs=1), decoded=[], refreshed=[],
                             ending=False, refresh_tokens=0)
    prof.step_ended(report)
    prof.step_ended(SimpleNamespace(**{**vars(report), "ending": True}))
    got = [json.loads(x) for x in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [(x["alloc_retries"], x["device_mallocs"]) for x in got] == [(2, 0), (0, 3)]
