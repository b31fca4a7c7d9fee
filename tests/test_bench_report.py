"""Speed report (vllm_odb/bench/report.py): schema checks, goals table, plots, CLI errors."""

from __future__ import annotations

import argparse
import json

import pytest

from vllm_odb.bench import report
from vllm_odb.bench.__main__ import main as bench_main


def _row(model, engine, method, gen, batch, tps, replay=True, **kw):
    return {"method": method, "engine": engine, "model": model, "replay": replay,
            "trace_model": "tiny-llada" if replay else None, "gen_length": gen, "batch": batch, "requests": 4,
            "tokens_per_s": tps, "latency_p50_s": 1.0, "latency_p90_s": 1.5, "nfe": 10.0, "tokens_per_forward": 3.2,
            "refresh_tokens": 256.0, "gpu_mem_gb": None, "wall_s": 2.0, **kw}


def _step(kind, batch, query_tokens, ms, flops, nbytes, model="llada-8b"):
    return {"engine": "vllm", "model": model, "method": "odb", "kind": kind, "batch": batch,
            "query_tokens": query_tokens, "kv_tokens": 512, "ms": ms, "flops": flops, "bytes": nbytes}


def _data():
    rows = [
        _row("llada-8b", "reference", "vanilla", 1024, 1, 2.0),
        _row("llada-8b", "reference", "fast-dllm", 1024, 1, 40.0),
        _row("llada-8b", "vllm", "odb", 1024, 1, 600.0, decode_step_ms_p50=6.5, weight_stream_floor_ms=5.0,
             step_over_floor=1.3),
        _row("llada-8b", "vllm", "odb", 1024, 8, 2400.0),
        _row("llada-8b", "vllm", "odb", 1024, 64, 9600.0),
        _row("llada-8b", "vllm", "odb", 256, 1, 500.0),
        _row("llada-8b", "vllm", "odb", 1024, 1, 1.0, replay=False),  # not replayed: never in the goals
        _row("dream-7b", "vllm", "odb", 512, 1, 450.0),
        _row("dream-7b", "reference", "fast-dllm", 512, 1, 50.0, note="short run"),
        _row("tiny-llada", "reference", "odb", 64, 4, 900.0, replay=False),
    ]
    steps = [_step("decode", 1, 32, 6.0, 5e11, 16e9), _step("decode", 8, 256, 7.0, 4e12, 16e9),
             _step("refresh", 1, 768, 60.0, 1.2e13, 16.5e9), _step("jump", 1, 250, 8.0, 4e12, 16e9)]
    meta = {"device": "NVIDIA H100", "commands": ["python -m vllm_odb.bench speed"],
            "ceilings": {"bf16_matmul_tflops": 780.0, "copy_bandwidth_gbs": 3000.0, "ridge_flop_per_byte": 260.0}}
    return {"meta": meta, "rows": rows, "steps": steps}


def _write(tmp_path, data, name="results.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _goal_lines(md, model):
    return {line.split(" | ")[2]: line for line in md.splitlines() if line.startswith(f"| {model} | ") and "÷" in line}


def test_goals_ratios_and_status(tmp_path):
    data = report.load_results(_write(tmp_path, _data()))
    md = report.build_markdown(data, "results.json")
    llada = _goal_lines(md, "llada-8b")
    # the four goals above, and odb ÷ odb-alp at each of odb's batches (no odb-alp row: not measured)
    assert len(llada) == 7 and all("| 1024 |" in line for line in llada.values())
    assert all("| not measured |" in llada[f"vllm odb ÷ odb-alp tok/s, batch {b}"] for b in (1, 8, 64))
    fast = llada["vllm odb ÷ reference (plain) fast-dllm tok/s, batch 1"]
    assert "| 15.0x | >= 10x | met |" in fast and "600.0 / 40.0 tok/s" in fast
    assert "| 300.0x | >= 250x | met |" in llada["vllm odb ÷ reference (plain) vanilla tok/s, batch 1"]
    floor = llada["vllm decode step ÷ weight-streaming floor, batch 1"]
    assert "| 1.30x | <= 1.2x | not met |" in floor and "step 6.50 ms / floor 5.00 ms" in floor
    assert "| 16.0x | >= 15x | met |" in llada["vllm odb tok/s at 64 concurrent ÷ batch 1"]

    dream = _goal_lines(md, "dream-7b")  # only gen 512, no vanilla, no floor, no batch 64
    assert "| 9.00x | >= 10x | not met |" in dream["vllm odb ÷ reference (plain) fast-dllm tok/s, batch 1"]
    for goal in ("vllm odb ÷ reference (plain) vanilla tok/s, batch 1", "vllm decode step ÷ weight-streaming floor, batch 1",
                 "vllm odb tok/s at 64 concurrent ÷ batch 1"):
        assert "| - |" in dream[goal] and "| not measured |" in dream[goal]
    assert "dream-7b: no replayed rows at gen_length 1024; used the largest present, 512." in md
    assert _goal_lines(md, "tiny-llada") == {}


def test_goals_use_the_calibrated_reference_and_list_the_plain_one(tmp_path):
    """With both reference impls measured, the goals divide by the calibrated ('research') rows and
    add the same two ratios against the faster 'plain' rows; the rows table names each impl."""
    data = _data()
    data["rows"] += [_row("llada-8b", "reference", "vanilla", 1024, 1, 1.5, attention_impl="research"),
                     _row("llada-8b", "reference", "fast-dllm", 1024, 1, 30.0, attention_impl="research")]
    data["rows"][1]["attention_impl"] = "plain"
    md = report.build_markdown(report.load_results(_write(tmp_path, data)), "results.json")
    llada = _goal_lines(md, "llada-8b")
    assert len(llada) == 9
    assert "| 20.0x | >= 10x | met | 600.0 / 30.0 tok/s |" in llada["vllm odb ÷ reference (research) fast-dllm tok/s, batch 1"]
    assert "| 400.0x |" in llada["vllm odb ÷ reference (research) vanilla tok/s, batch 1"]
    assert "| 15.0x |" in llada["vllm odb ÷ reference (plain) fast-dllm tok/s, batch 1"]
    assert "| 300.0x |" in llada["vllm odb ÷ reference (plain) vanilla tok/s, batch 1"]
    assert "| llada-8b | yes (tiny-llada) | reference (research) | fast-dllm | 1024 | 1 | 30.0 |" in md
    # Goals keep their order: the calibrated pair first, the plain pair after them, then the step goals.
    names = [line.split(" | ")[2] for line in md.splitlines() if line.startswith("| llada-8b | 1024 |")]
    assert names[0] == "vllm odb ÷ reference (research) fast-dllm tok/s, batch 1"
    assert names[5] == "vllm odb ÷ reference (plain) vanilla tok/s, batch 1"
    assert names[6:] == [f"vllm odb ÷ odb-alp tok/s, batch {b}" for b in (1, 8, 64)]


def test_step_and_jump_share_goals(tmp_path):
    """The roofline-step goals (plain decode step over the floor at batch 1, odb-alp over fast-dllm)
    and the jump-share ones (odb over odb-alp: 1.3x at batch 1, 1.0x elsewhere), at every batch with
    a row of either method; fast-dllm's step stands for the plain step, else odb-alp's."""
    data = _data()
    data["rows"] += [
        _row("llada-8b", "vllm", "fast-dllm", 1024, 1, 300.0, decode_step_ms_p50=6.0, weight_stream_floor_ms=5.0,
             step_over_floor=1.2),
        _row("llada-8b", "vllm", "odb-alp", 1024, 1, 400.0, decode_step_ms_p50=6.5, weight_stream_floor_ms=5.0,
             step_over_floor=1.3),
        _row("llada-8b", "vllm", "odb-alp", 1024, 8, 2500.0),
        _row("llada-8b", "vllm", "fast-dllm", 1024, 32, 3000.0),
    ]
    llada = _goal_lines(report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json"), "llada-8b")
    floor = llada["vllm plain decode step ÷ weight-streaming floor, batch 1"]
    assert "| 1.20x | <= 1.25x | met |" in floor and "vllm fast-dllm: step 6.00 ms" in floor
    assert "| 1.33x | >= 1.1x | met |" in llada["vllm odb-alp ÷ fast-dllm tok/s, batch 1"]
    assert "| not measured |" in llada["vllm odb-alp ÷ fast-dllm tok/s, batch 8"]  # no fast-dllm row at 8
    assert "| not measured |" in llada["vllm odb-alp ÷ fast-dllm tok/s, batch 32"]
    assert "vllm odb-alp ÷ fast-dllm tok/s, batch 64" not in llada  # neither method ran at 64
    assert "| 1.50x | >= 1.3x | met |" in llada["vllm odb ÷ odb-alp tok/s, batch 1"]
    assert "| 0.96x | >= 1x | not met |" in llada["vllm odb ÷ odb-alp tok/s, batch 8"]
    assert "vllm odb ÷ odb-alp tok/s, batch 32" not in llada
    data["rows"] = [r for r in data["rows"] if (r["method"], r["batch"]) != ("fast-dllm", 1)]
    llada = _goal_lines(report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json"), "llada-8b")
    assert "| 1.30x | <= 1.25x | not met |" in llada["vllm plain decode step ÷ weight-streaming floor, batch 1"]


def test_batch1_ratios_use_the_requests_both_rows_ran(tmp_path):
    """Requests differ in length (here 24 vs 5 tokens), so a 1-request row and a 3-request row
    compare only over their common first request; rows without the lists fall back to tok/s."""
    data = _data()
    rows = data["rows"]
    rows[0].update(request_latency_s=[40.0], request_tokens=[24])  # reference vanilla, 1 request
    rows[1].update(request_latency_s=[1.0, 0.5, 0.5], request_tokens=[24, 5, 5])  # reference fast-dllm
    rows[2].update(request_latency_s=[0.1, 0.05, 0.05, 0.05], request_tokens=[24, 5, 5, 1])  # vllm odb
    llada = _goal_lines(report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json"), "llada-8b")
    fast = llada["vllm odb ÷ reference (plain) fast-dllm tok/s, batch 1"]
    assert "| 10.0x |" in fast and "170.0 / 17.0 tok/s over the first 3 requests of both rows" in fast
    vanilla = llada["vllm odb ÷ reference (plain) vanilla tok/s, batch 1"]
    assert "| 400.0x |" in vanilla and "240.0 / 0.6 tok/s over the first 1 requests" in vanilla
    rows[1]["request_tokens"] = [24, 6, 5]  # not the same requests: the row rates are used
    llada = _goal_lines(report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json"), "llada-8b")
    assert "600.0 / 40.0 tok/s |" in llada["vllm odb ÷ reference (plain) fast-dllm tok/s, batch 1"]


def test_rows_table_sorted_and_sparse(tmp_path):
    md = report.build_markdown(report.load_results(_write(tmp_path, _data())), "results.json")
    rows_part = md.split("## Rows")[1].split("\n## ")[0]  # (the sections after it have tables too)
    table = [line for line in rows_part.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| model | replay | engine | method | gen | batch | tok/s | p50 s | p90 s | NFE |")
    keys = [(c[0], int(c[4]), int(c[5]), c[2], c[3]) for c in (line.strip("| ").split(" | ") for line in table[1:])]
    assert keys == sorted(keys) and len(keys) == 10
    # Rows from before attention_impl was recorded are the plain reference.
    assert ("| dream-7b | yes (tiny-llada) | reference (plain) | fast-dllm | 512 | 1 | 50.0 | 1.000 | 1.500 | 10.0 "
            "| 3.20 | 256 | - |") in md
    assert "- dream-7b reference (plain) fast-dllm gen 512 batch 1: short run" in md
    assert "```bash\npython -m vllm_odb.bench speed\n```" in md


def test_goals_not_measured_without_replayed_rows(tmp_path):
    rows = [_row("llada-8b", "vllm", "odb", 1024, 1, 600.0, replay=False),
            _row("tiny-dream", "vllm", "odb", 64, 1, 9.0, replay=False)]
    md = report.build_markdown(report.load_results(_write(tmp_path, {"rows": rows})), "r.json")
    lines = _goal_lines(md, "llada-8b")
    assert len(lines) == 4 and all("| not measured |" in line for line in lines.values())
    assert "- llada-8b: no replayed rows." in md and "tiny-dream |" not in md.split("## Goals")[1]
    empty = report.build_markdown(report.load_results(_write(tmp_path, {"rows": [], "meta": None})), "e.json")
    assert "No rows." in empty and "No full-size model rows: goals not measured." in empty


def test_cli_writes_markdown_and_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, out, md = _write(tmp_path, _data()), tmp_path / "plots", tmp_path / "report.md"
    assert bench_main(["report", str(path), "--out-dir", str(out), "--md", str(md)]) == 0
    names = {"throughput_vs_batch_llada-8b_g1024.png", "throughput_vs_gen_llada-8b_b1.png", "roofline_llada-8b.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
        assert f"](plots/{name})" in md.read_text()
    err = capsys.readouterr().err
    assert "skipped roofline_dream-7b.png: no steps" in err
    assert "skipped throughput_vs_batch_dream-7b_g512.png: one batch size only" in err
    assert "skipped throughput_vs_gen_dream-7b_b1.png: fewer than two gen lengths at batch 1" in err


def test_plots_skipped_when_data_missing(tmp_path):
    pytest.importorskip("matplotlib")
    data = _data()
    data["meta"]["ceilings"] = {}
    data["rows"] = [r for r in data["rows"] if r["batch"] == 1 and r["gen_length"] == 1024]
    written, skipped = report.write_plots(report.load_results(_write(tmp_path, data)), tmp_path / "plots")
    assert written == [] and not any((tmp_path / "plots").iterdir())
    assert "roofline_llada-8b.png: meta.ceilings lacks bf16_matmul_tflops or copy_bandwidth_gbs" in skipped
    assert "throughput_vs_batch_llada-8b_g1024.png: one batch size only" in skipped


def test_markdown_to_stdout_without_plots(tmp_path, capsys):
    assert bench_main(["report", str(_write(tmp_path, _data()))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Speed benchmark: results.json") and "## Goals" in out and "## Plots" not in out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ([1, 2], "not a speed-benchmark file"),
    ({"results": []}, "not a speed-benchmark file"),
    ({"rows": [{"method": "odb"}]}, "rows[0] lacks 'engine'"),
    ({"rows": [_row("m", "vllm", "odb", "1024", 1, 1.0)]}, "rows[0].gen_length must be int, got '1024'"),
    ({"rows": [_row("m", "vllm", "odb", 64, True, 1.0)]}, "rows[0].batch must be int, got True"),
    ({"rows": [], "steps": [{"kind": "decode"}]}, "steps[0] lacks 'engine'"),
    ({"rows": [], "meta": {"ceilings": {"copy_bandwidth_gbs": "x"}}}, "meta.ceilings.copy_bandwidth_gbs must be float"),
])
def test_bad_input_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "missing.json" if content is None else _write(tmp_path, content)
    assert bench_main(["report", str(path), "--out-dir", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "plots").exists()


def test_concurrency_ceiling_from_refresh_flops_and_peak(tmp_path):
    """The bound the concurrency goal can reach: response tokens / (refresh FLOPs / bf16 peak)."""
    from vllm_odb.bench.costs import forward_flops
    from vllm_odb.bench.full_size import llada_8b_config
    from vllm_odb.checkpoint import ModelSpec

    data = _data()
    data["rows"][4]["response_tokens"] = 64 * 8  # odb at 64: 8 response tokens a request
    data["rows"][4]["requests"] = 64
    line = report.concurrency_ceiling(data["rows"], "llada-8b", 1024, data["meta"])
    seconds = forward_flops(ModelSpec.from_config(llada_8b_config()), 256) / 780e12
    ceiling = 8 / seconds
    assert f"at most {ceiling:.0f} tok/s" in line
    assert f"= {report._ratio(ceiling / 600.0)} its batch-1 rate (600.0 tok/s)" in line
    assert f"{9600.0 / ceiling:.0%} of the ceiling" in line
    md = report.build_markdown(report.load_results(_write(tmp_path, data)), "results.json")
    assert "Compute ceiling of the 64-concurrent goal" in md and line in md
    # no bound without the facts: no peak, no response tokens, not a full-size model
    assert report.concurrency_ceiling(data["rows"], "llada-8b", 1024, {}) is None
    assert report.concurrency_ceiling(_data()["rows"], "llada-8b", 1024, data["meta"]) is None
    assert report.concurrency_ceiling(data["rows"], "tiny-llada", 64, data["meta"]) is None



# ----------------------------------------------------------------------------- roofline

# A toy model whose costs are easy by hand (bench/costs.py): per forward of t query rows against k
# keys, FLOPs = 2 * 22 * t (linear) + 4 * t * k * 2 (attention) = 44 t + 8 t k; bytes = 56 (weights)
# + 8 per key (K and V). Ceilings of 1 FLOP/s and 1 byte/s make a forward's seconds max(FLOPs, bytes).
TOY = {"num_layers": 1, "hidden_size": 2, "head_dim": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 1,
       "vocab_size": 3, "logits_shift": 0}
ONE_FLOP, ONE_BYTE = 1e-12, 1e-9  # TFLOP/s, GB/s
# prompt 2, gen 4 in blocks of 2: block 0 in two forwards (its refresh, one cached step), block 1 in
# its refresh alone
TRACE = {"prompt_len": 2, "replay": {"commits": [[1, 1], [2]], "lengths": [4, 4]}}


def _toy():
    from types import SimpleNamespace

    from vllm_odb.policies import DecodeConfig

    return SimpleNamespace(**TOY), DecodeConfig.for_method("fast-dllm", gen_length=4, block_length=2)


def test_forward_seconds_is_the_slower_ceiling():
    from vllm_odb.bench.roofline import forward_seconds

    assert forward_seconds(100, 400, ONE_FLOP, ONE_BYTE) == pytest.approx(400)
    assert forward_seconds(4e12, 1e9, 1.0, 1.0) == pytest.approx(4.0)  # 4 TFLOP at 1 TFLOP/s vs 1 s


def test_vllm_roofline_by_hand():
    """vLLM, batch 1: step 0 = prefill (2 rows, 2 keys: 44*2 + 8*4 = 120) + refresh (6 rows, 6 keys:
    264 + 288 = 552); block 0's cached step (2 rows, 6 keys: 88 + 96 = 184) + block 1's refresh (552);
    block 1, completed by its refresh, goes out with one idle step (184). Sum 1592 s, 5 forwards."""
    from vllm_odb.bench.roofline import row_seconds

    spec, cfg = _toy()
    assert row_seconds([TRACE], spec, cfg, "vllm", 1, ONE_FLOP, ONE_BYTE) == (pytest.approx(1592), 5)
    # Memory bound (FLOPs free): bytes 72 + 104 | 104 + 104 | 104 = 488 a request alone; two together
    # stream the weights (56 bytes) once per forward: 88 + 152 | 152 + 152 | 152 = 696, not 976.
    assert row_seconds([TRACE], spec, cfg, "vllm", 1, 1e30, ONE_BYTE)[0] == pytest.approx(488)
    assert row_seconds([TRACE] * 2, spec, cfg, "vllm", 1, 1e30, ONE_BYTE)[0] == pytest.approx(976)
    assert row_seconds([TRACE] * 2, spec, cfg, "vllm", 2, 1e30, ONE_BYTE)[0] == pytest.approx(696)
    assert row_seconds([TRACE] * 2, spec, cfg, "vllm", 2, 1e30, ONE_BYTE, max_num_seqs=1)[0] == pytest.approx(976)


def test_vllm_jump_share_roofline_follows_the_batch():
    """A jump-share engine's decode forward takes the step's canvas (knobs.step_width of the
    previous step's requests): ridge_rows = 8, block 2. Alone: the whole canvas, 8 rows against 6
    keys (352 + 384 = 736) in place of the plain 184 twice. Four together, memory bound: the
    decode steps' rows do not matter; compute bound (bytes free), four requests' decode forwards
    take 8 // 4 = 2 rows each (the window): the plain engine's FLOPs, not 4 x 8 rows."""
    from vllm_odb.bench.roofline import row_seconds
    from vllm_odb.policies import DecodeConfig

    spec, plain = _toy()
    jump = DecodeConfig.for_method("odb", gen_length=4, block_length=2, ridge_rows=8)
    assert row_seconds([TRACE], spec, jump, "vllm", 1, ONE_FLOP, ONE_BYTE)[0] == pytest.approx(1592 - 2 * 184 + 2 * 736)
    four = [row_seconds([TRACE] * 4, spec, c, "vllm", 4, ONE_FLOP, 1e30)[0] for c in (plain, jump)]
    assert four[1] == pytest.approx(four[0])


def test_reference_roofline_by_hand():
    """Reference dual cache: block 0 = refresh over prompt + canvas (552) + a cached step on the
    block (184); block 1 = its refresh (552): 1288 s, 3 forwards. Jump-share: the cached step takes
    the draft canvas, ridge_rows = 4 rows against 6 keys (176 + 192 = 368)."""
    from vllm_odb.bench.roofline import row_seconds
    from vllm_odb.policies import DecodeConfig

    spec, cfg = _toy()
    assert row_seconds([TRACE], spec, cfg, "reference", 1, ONE_FLOP, ONE_BYTE) == (pytest.approx(1288), 3)
    jump = DecodeConfig.for_method("odb", gen_length=4, block_length=2, ridge_rows=4)
    assert row_seconds([TRACE], spec, jump, "reference", 1, ONE_FLOP, ONE_BYTE)[0] == pytest.approx(552 + 368 + 552)


def _roof_rows():
    return [_row("llada-8b", "vllm", "odb", 1024, 1, 600.0, requests=2, wall_s=0.14, roofline_s=0.1),
            _row("llada-8b", "vllm", "odb", 1024, 64, 9600.0, requests=64, wall_s=2.0, roofline_s=1.6),
            _row("llada-8b", "vllm", "fast-dllm", 1024, 1, 500.0, requests=4, wall_s=0.3, roofline_s=0.1),
            _row("llada-8b", "vllm", "fast-dllm", 1024, 64, 8000.0, requests=64, wall_s=2.0, roofline_s=1.5)]


def test_recorded_roofline_columns_and_targets(tmp_path):
    """ms/req = roofline / requests; x roofline = wall / roofline; % = roofline / wall."""
    data = _data()
    data["rows"] = _roof_rows()
    md = report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json")
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.endswith("| GPU GB | roofline ms/req | x roofline | % roofline tok/s |")
    assert "| llada-8b | yes (tiny-llada) | vllm | odb | 1024 | 1 |" in md
    assert "| 50.0 | 1.40x | 71% |" in md  # 0.1 s / 2 requests; 0.14 / 0.1; 0.1 / 0.14
    assert "| 25.0 | 1.25x | 80% |" in md  # 1.6 s / 64; 2.0 / 1.6; 1.6 / 2.0
    assert "| 25.0 | 3.00x | 33% |" in md and "| 23.4 | 1.33x | 75% |" in md
    assert ("- llada-8b gen 1024, vllm odb: batch 1 at 1.40x its roofline time (target <= 1.4x): met; 64 concurrent "
            "at 80% of the roofline throughput (target >= 80%): met.") in md
    assert ("- llada-8b gen 1024, vllm fast-dllm: batch 1 at 3.00x its roofline time (target <= 1.4x): not met; "
            "64 concurrent at 75% of the roofline throughput (target >= 80%): not met.") in md
    assert "* = computed" not in md and "n/a" not in md


def test_old_rows_render_with_n_a_and_traces_fill_them_in(tmp_path):
    """Rows written before roofline_s: 'n/a (row lacks roofline_s)', targets not measured; with the
    traces they replayed, report computes the roofline itself at the file's ceilings (marked *)."""
    from vllm_odb.bench.full_size import llada_8b_config
    from vllm_odb.bench.roofline import row_seconds
    from vllm_odb.bench.speed import method_config
    from vllm_odb.checkpoint import ModelSpec

    data = _data()
    md = report.build_markdown(report.load_results(_write(tmp_path, data)), "r.json")
    assert "| n/a (row lacks roofline_s) | - | - |" in md
    assert "- llada-8b gen 1024, vllm odb: batch 1: not measured (row lacks roofline_s); batch 64: not measured" in md
    traces = {"trace_model": "checkpoints/tiny-llada", "traces": {"odb|1024|vllm": [
        {"prompt_len": 50 + i, "response_tokens": 8, "replay": {"commits": [[20, 12]], "lengths": [32]}}
        for i in range(64)]}}
    path = _write(tmp_path, traces, "traces.json")
    assert bench_main(["report", str(_write(tmp_path, data)), "--traces", str(path), "--md", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    spec, ceil = ModelSpec.from_config(llada_8b_config()), data["meta"]["ceilings"]
    cfg = method_config("odb", 1024, argparse.Namespace(block_length=32, threshold=0.9, ridge_rows=None))
    one = row_seconds(traces["traces"]["odb|1024|vllm"][:4], spec, cfg, "vllm", 1, 780.0, 3000.0)[0]
    assert ceil == {"bf16_matmul_tflops": 780.0, "copy_bandwidth_gbs": 3000.0, "ridge_flop_per_byte": 260.0}
    assert f"| {1e3 * one / 4:.1f}* | {report._ratio(2.0 / one)} | {one / 2.0:.0%} |" in md
    assert "* = computed by report from --traces" in md
    assert "| n/a (row lacks roofline_s, traces lack 4 of fast-dllm\\|1024\\|reference) | - | - |" in md


def test_shipped_results_render_their_roofline(tmp_path):
    """The shipped LLaDA results (written before roofline_s) with the traces they replayed."""
    speed_dir = "benchmarks/results/speed"
    md = report.build_markdown(report.load_results(f"{speed_dir}/speed-llada-8b-final.json"), "f.json",
                               traces=report.load_traces([f"{speed_dir}/traces-llada-8b.json"]))
    assert "n/a" not in md.split("## Goals")[0]
    assert "- llada-8b gen 1024, vllm odb: batch 1 at " in md and "64 concurrent at " in md


def test_bad_traces_file_is_a_clear_error(tmp_path, capsys):
    bad = _write(tmp_path, {"rows": []}, "traces.json")
    assert bench_main(["report", str(_write(tmp_path, _data())), "--traces", str(bad)]) == 2
    assert "not a traces file" in capsys.readouterr().err


def test_wall_split_section_for_rows_that_carry_it(tmp_path):
    """Rows with ``bench speed``'s step split get a section of their wall time by kind of step;
    older rows (without it) get none."""
    data = _data()
    assert "Where the wall went" not in report.build_markdown(report.load_results(_write(tmp_path, data)), "r")
    data["rows"][0].update({"steps_per_request": 80.5, "decode_s_per_request": 0.35, "decode_steps_per_request": 63,
                            "refresh_step_s_per_request": 0.19, "refresh_step_steps_per_request": 6.5,
                            "idle_s_per_request": 0.03, "idle_steps_per_request": 6,
                            "untimed_s_per_request": 0.11})
    md = report.build_markdown(report.load_results(_write(tmp_path, data, "split.json")), "r")
    part = md.split("## Where the wall went")[1].split("## Goals")[0]
    assert "| 80.5 | 350.0 ms / 63 | 190.0 ms / 6.5 | 30.0 ms / 6 | 110.0 ms | - | - |" in part
    data["rows"][0].update({"refresh_graphed": 0.622, "alloc_retries_per_request": 0.0,
                            "device_mallocs_per_request": 0.12})
    md = report.build_markdown(report.load_results(_write(tmp_path, data, "split2.json")), "r")
    assert "| 110.0 ms | 62% | 0 / 0.12 |" in md.split("## Where the wall went")[1]


def test_step_efficiency_and_the_refresh_target(tmp_path):
    """Each kind of step against its roofline (medians), refreshes against the bf16 peak, and the
    refresh target over single-request refreshes of 1-2k tokens."""
    data = _data()
    data["meta"]["ceilings"] = {"bf16_matmul_tflops": 100.0, "copy_bandwidth_gbs": 1000.0}
    flops = 1.5e12  # 15 ms at the peak
    data["steps"] = [_step("refresh", 1, 1500, ms, flops, 1e9) for ms in (20.0, 25.0, 30.0)]
    data["steps"].append(_step("decode", 1, 32, 4.0, 1e10, 2e9))  # roofline 2 ms: 50%
    md = report.build_markdown(report.load_results(_write(tmp_path, data)), "r")
    part = md.split("## Step efficiency")[1].split("## Goals")[0]
    assert "| llada-8b | vllm | odb | decode | 1 | 32 | 1 | 4.00 | 2.00 | 50% | - |" in part
    assert "| llada-8b | vllm | odb | refresh | 1 | 1500 | 3 | 25.00 | 15.00 | 60% | 60% |" in part
    assert "median 60% over 3 refreshes" in part and ": not met." in part
    data["steps"] = data["steps"][:1]  # 20 ms: 75% of the peak
    md = report.build_markdown(report.load_results(_write(tmp_path, data, "met.json")), "r")
    assert "median 75% over 1 refreshes" in md and ": met." in md
