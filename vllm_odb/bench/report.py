"""``python -m vllm_odb.bench report results.json --out-dir DIR [--md FILE]``: speed results -> markdown and plots.

Reads the JSON written by ``python -m vllm_odb.bench speed`` (``meta``, ``rows``, ``steps``) and writes
a markdown summary (the rows table and the goals table, computed only from this file's rows) to
``--md`` or stdout, and PNG plots (throughput vs batch, throughput vs gen length, a roofline of the
per-step profile) to ``--out-dir``. A plot whose data is missing is skipped with a message.

Every row shows its roofline (bench/roofline.py: its forwards at the run's measured ceilings) as
ms per request, wall time ÷ roofline time and tok/s ÷ roofline tok/s, and the goals section flags
the roofline targets (batch 1 within 1.4x, 64 concurrent at 80%). Rows that carry ``step_split``
get where their wall went by kind of step; the sampled steps get a "Step efficiency" section (each
kind against its roofline, refreshes against the bf16 peak, and the refresh target: 1-2k tokens at
70% of the peak). Rows written before ``speed``
recorded ``roofline_s`` show n/a, or, with ``--traces FILE`` (the traces they replayed), the
roofline computed here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

GOAL_GEN = 1024  # gen_length the goals are stated at
CONCURRENT = 64  # batch of the concurrency goal
ROW_KEYS = {"method": str, "engine": str, "model": str, "replay": bool, "gen_length": int, "batch": int,
            "tokens_per_s": float}
ROW_OPTIONAL = {"trace_model": str, "note": str, "requests": int, "latency_p50_s": float, "latency_p90_s": float,
                "nfe": float, "tokens_per_forward": float, "refresh_tokens": float, "gpu_mem_gb": float,
                "wall_s": float, "decode_step_ms_p50": float, "weight_stream_floor_ms": float,
                "step_over_floor": float, "response_tokens": int, "attention_impl": str,
                "request_latency_s": list, "request_tokens": list, "max_num_seqs": int, "roofline_s": float,
                "roofline_forwards": int, "roofline_ceilings": dict, "traces_of": str}
STEP_KEYS = {"engine": str, "model": str, "kind": str, "batch": int, "query_tokens": int, "ms": float,
             "flops": float, "bytes": float}
STEP_OPTIONAL = {"method": str, "kv_tokens": int}
# (header, row key, format)
COLUMNS = [("tok/s", "tokens_per_s", ".1f"), ("p50 s", "latency_p50_s", ".3f"), ("p90 s", "latency_p90_s", ".3f"),
           ("NFE", "nfe", ".1f"), ("tok/fwd", "tokens_per_forward", ".2f"), ("refresh tokens", "refresh_tokens", ".0f"),
           ("GPU GB", "gpu_mem_gb", ".1f")]
ROOFLINE_COLUMNS = ["roofline ms/req", "x roofline", "% roofline tok/s"]
ROOFLINE_NOTE = ("Roofline: the row's forwards (refreshes, decode steps, draft rows; bench/roofline.py), each at "
                 "max(FLOPs / bf16 peak, bytes / copy bandwidth) with the ceilings measured in the same run; "
                 "ms/req = roofline time / requests; x roofline = wall time / roofline time; "
                 "% roofline tok/s = tok/s / roofline tok/s = roofline time / wall time.")
NA_NOTE = (" n/a rows: no roofline_s (written before speed recorded it, or a vLLM row on a tiny checkpoint, "
           "which replays no trace); for replayed rows, --traces FILE (the traces they replayed) computes it.")
TRACES_NOTE = (" * = computed by report from --traces at meta.ceilings (the row predates speed recording "
               "roofline_s).")
BATCH1_TARGET = 1.4  # a batch-1 request within this many times its roofline time
CONCURRENT_TARGET = 0.8  # CONCURRENT requests at least this share of their roofline throughput


class ReportError(ValueError):
    pass


@dataclass
class Goal:
    name: str
    target: float
    at_least: bool  # the goal is value >= target (else value <= target)
    value: float | None = None
    source: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "not measured"
        return "met" if (self.value >= self.target if self.at_least else self.value <= self.target) else "not met"


def _check(obj: object, where: str, required: dict, optional: dict) -> None:
    if not isinstance(obj, dict):
        raise ReportError(f"{where} is not an object")
    for key in required:
        if key not in obj:
            raise ReportError(f"{where} lacks {key!r}")
    for key, typ in {**required, **optional}.items():
        value = obj.get(key)
        if key not in required and value is None:
            continue
        if typ in (int, float):  # float accepts ints; neither accepts bools
            ok = isinstance(value, (int, float) if typ is float else int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, typ)
        if not ok:
            raise ReportError(f"{where}.{key} must be {typ.__name__}, got {value!r}")


def load_results(path: str | os.PathLike) -> dict:
    """The results file, checked against the speed-benchmark schema (raises ReportError naming the problem)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ReportError(f"{path}: not a speed-benchmark file (expected an object with a 'rows' list)")
    meta = data["meta"] = {} if data.get("meta") is None else data["meta"]
    steps = data["steps"] = [] if data.get("steps") is None else data["steps"]
    _check(meta, f"{path}: meta", {}, {"device": str, "ceilings": dict, "commands": list})
    _check(meta.get("ceilings") or {}, f"{path}: meta.ceilings", {},
           {"bf16_matmul_tflops": float, "copy_bandwidth_gbs": float, "ridge_flop_per_byte": float})
    if not isinstance(steps, list):
        raise ReportError(f"{path}: 'steps' must be a list")
    for i, row in enumerate(data["rows"]):
        _check(row, f"{path}: rows[{i}]", ROW_KEYS, ROW_OPTIONAL)
    for i, step in enumerate(steps):
        _check(step, f"{path}: steps[{i}]", STEP_KEYS, STEP_OPTIONAL)
    return data


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def _impl(row: dict) -> str | None:
    """A reference row's attention_impl ('plain' for rows written before it was recorded)."""
    return row.get("attention_impl", "plain") if row["engine"] == "reference" else None


def _engine_label(row: dict) -> str:
    impl = _impl(row)
    return f"{row['engine']} ({impl})" if impl else row["engine"]


def _find(rows: list[dict], engine: str, method: str, batch: int, impl: str | None = None) -> dict | None:
    """The first row of (engine, method, batch); a reference row of attention_impl ``impl`` when given."""
    return next((r for r in rows if (r["engine"], r["method"], r["batch"]) == (engine, method, batch)
                 and (impl is None or _impl(r) == impl)), None)


def _throughput_ratio(name: str, target: float, rows: list[dict], num: tuple, den: tuple) -> Goal:
    """num / den tok/s; each is (engine, method, batch[, attention_impl])."""
    goal = Goal(name, target, at_least=True)
    found = {key: _find(rows, *key) for key in (num, den)}
    missing = [" ".join(map(str, key)) for key, r in found.items() if r is None or r["tokens_per_s"] <= 0]
    if missing:
        goal.source = "no row (or zero tok/s): " + ", ".join(missing)
        return goal
    n, d = found[num], found[den]
    matched = _matched_rates(n, d)
    if matched:
        (rate_n, rate_d), m = matched
        goal.value = rate_n / rate_d
        goal.source = f"{_rate(rate_n)} / {_rate(rate_d)} tok/s over the first {m} requests of both rows"
        return goal
    goal.value = n["tokens_per_s"] / d["tokens_per_s"]
    goal.source = f"{_rate(n['tokens_per_s'])} / {_rate(d['tokens_per_s'])} tok/s"
    return goal


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _matched_rates(a: dict, b: dict) -> tuple[tuple[float, float], int] | None:
    """Batch-1 rows that list each request: tok/s of each over the requests both ran (requests
    differ in length, so rows of different request counts are not comparable as they stand).
    None when either row lacks the lists or their requests differ."""
    la, lb = a.get("request_latency_s"), b.get("request_latency_s")
    ta, tb = a.get("request_tokens"), b.get("request_tokens")
    if not (la and lb and ta and tb) or len(la) != len(ta) or len(lb) != len(tb):
        return None
    m = min(len(la), len(lb))
    if ta[:m] != tb[:m] or sum(ta[:m]) == 0 or min(sum(la[:m]), sum(lb[:m])) <= 0:
        return None
    return (sum(ta[:m]) / sum(la[:m]), sum(tb[:m]) / sum(lb[:m])), m


def full_size_models(rows: list[dict]) -> list[str]:
    """Models the goals are stated for: every model with replayed rows, and every model not named ``tiny*``."""
    return sorted({r["model"] for r in rows if r["replay"] or not r["model"].startswith("tiny")})


def _goal_rows(rows: list[dict], model: str) -> tuple[int | None, list[dict]]:
    """The gen_length the goals of a model use (GOAL_GEN, else its longest) and its replayed rows there."""
    replayed = [r for r in rows if r["replay"] and r["model"] == model]
    gens = {r["gen_length"] for r in replayed}
    gen = GOAL_GEN if GOAL_GEN in gens else max(gens, default=None)
    return gen, [r for r in replayed if r["gen_length"] == gen]


def goals(rows: list[dict], model: str) -> tuple[int | None, list[Goal]]:
    """The gen_length used and the goals of one full-size model, from its replayed rows at that length."""
    gen, at = _goal_rows(rows, model)
    # The reference stands for the research code: its calibrated impl ('research') where measured;
    # ratios against our faster 'plain' layout follow as extra lines when both were measured.
    impls = [i for i in ("research", "plain") if any(_impl(r) == i for r in at)] or ["plain"]
    odb1 = ("vllm", "odb", 1)
    fast1, vanilla1 = ("reference", "fast-dllm", 1, impls[0]), ("reference", "vanilla", 1, impls[0])
    floor = Goal("vllm decode step ÷ weight-streaming floor, batch 1", 1.2, at_least=False,
                 source="no vllm batch-1 row with step_over_floor")
    with_floor = sorted((r for r in at if r["engine"] == "vllm" and r["batch"] == 1
                         and r.get("step_over_floor") is not None), key=lambda r: (r["method"] != "odb", r["method"]))
    if with_floor:
        r = with_floor[0]
        floor.value = r["step_over_floor"]
        floor.source = (f"vllm {r['method']}: step {_fmt(r.get('decode_step_ms_p50'), '.2f')} ms / "
                        f"floor {_fmt(r.get('weight_stream_floor_ms'), '.2f')} ms")
    out = [
        _throughput_ratio(f"vllm odb ÷ reference ({impls[0]}) fast-dllm tok/s, batch 1", 10, at, odb1, fast1),
        _throughput_ratio(f"vllm odb ÷ reference ({impls[0]}) vanilla tok/s, batch 1", 250, at, odb1, vanilla1),
        floor,
        _throughput_ratio(f"vllm odb tok/s at {CONCURRENT} concurrent ÷ batch 1", 15, at,
                          ("vllm", "odb", CONCURRENT), odb1),
    ]
    for impl in impls[1:]:
        out += [_throughput_ratio(f"vllm odb ÷ reference ({impl}) fast-dllm tok/s, batch 1", 10, at, odb1,
                                  ("reference", "fast-dllm", 1, impl)),
                _throughput_ratio(f"vllm odb ÷ reference ({impl}) vanilla tok/s, batch 1", 250, at, odb1,
                                  ("reference", "vanilla", 1, impl))]
    return gen, out + step_goals(at)


PLAIN_FLOOR_TARGET = 1.25  # the roofline-step issue (#21): a plain batch-1 decode step over the weight floor
ALP_OVER_FAST = 1.1  # #21: odb-alp over fast-dllm, every batch
ODB_OVER_ALP = {1: 1.3}  # #22: odb over odb-alp at batch 1 (with real acceptance); 1.0 at every other batch


def step_goals(at: list[dict]) -> list[Goal]:
    """The roofline-step (#21) and jump-share (#22) goals among the vLLM rows ``at``: the plain decode
    step over the weight floor at batch 1 (``fast-dllm``'s row, else ``odb-alp``'s), and at every
    batch with a row of either method, ``odb-alp`` over ``fast-dllm`` and ``odb`` over ``odb-alp``."""
    out = []
    plain = [r for m in ("fast-dllm", "odb-alp") for r in at if (r["engine"], r["method"], r["batch"]) == ("vllm", m, 1)
             and r.get("step_over_floor") is not None]
    if plain:
        r = plain[0]
        out.append(Goal("vllm plain decode step ÷ weight-streaming floor, batch 1", PLAIN_FLOOR_TARGET, at_least=False,
                        value=r["step_over_floor"],
                        source=f"vllm {r['method']}: step {_fmt(r.get('decode_step_ms_p50'), '.2f')} ms / "
                               f"floor {_fmt(r.get('weight_stream_floor_ms'), '.2f')} ms"))
    batches = sorted({r["batch"] for r in at if r["engine"] == "vllm"})
    for num, den, target in (("odb-alp", "fast-dllm", lambda b: ALP_OVER_FAST),
                             ("odb", "odb-alp", lambda b: ODB_OVER_ALP.get(b, 1.0))):
        for b in batches:
            if _find(at, "vllm", num, b) or _find(at, "vllm", den, b):
                out.append(_throughput_ratio(f"vllm {num} ÷ {den} tok/s, batch {b}", target(b), at,
                                             ("vllm", num, b), ("vllm", den, b)))
    return out


def concurrency_ceiling(rows: list[dict], model: str, gen: int | None, meta: dict) -> str | None:
    """What the concurrency goal can reach at all: every request's refresh is compute-bound work
    (``refresh_tokens`` rows through the whole model), so no batch serves more than
    response tokens / (refresh FLOPs / measured bf16 peak) per second. One line per vLLM method
    with a row at ``CONCURRENT`` requests, against its own batch-1 rate; None without the facts."""
    from vllm_odb.bench.costs import forward_flops
    from vllm_odb.bench.full_size import FULL_SIZE
    from vllm_odb.checkpoint import ModelSpec

    peak = (meta.get("ceilings") or {}).get("bf16_matmul_tflops")
    if model not in FULL_SIZE or not peak or gen is None:
        return None
    spec = ModelSpec.from_config(FULL_SIZE[model]())
    lines = []
    for r in sorted(rows, key=lambda r: r["method"]):
        if (r["model"], r["engine"], r["batch"], r["gen_length"], r["replay"]) != (model, "vllm", CONCURRENT, gen, True):
            continue
        one = _find([x for x in rows if x["model"] == model and x["gen_length"] == gen and x["replay"]],
                    "vllm", r["method"], 1)
        if not (r.get("refresh_tokens") and r.get("response_tokens") and r.get("requests") and one):
            continue
        seconds = forward_flops(spec, int(round(r["refresh_tokens"]))) / (peak * 1e12)
        ceiling = r["response_tokens"] / r["requests"] / seconds
        lines.append(f"- {model} vllm {r['method']}: refresh {r['refresh_tokens']:.0f} tokens per request = "
                     f"{1e3 * seconds:.1f} ms at the bf16 peak for {r['response_tokens'] / r['requests']:.1f} response "
                     f"tokens: at most {ceiling:.0f} tok/s at any concurrency = {_ratio(ceiling / one['tokens_per_s'])} "
                     f"its batch-1 rate ({one['tokens_per_s']:.1f} tok/s); measured at {CONCURRENT}: "
                     f"{r['tokens_per_s']:.1f} tok/s ({r['tokens_per_s'] / ceiling:.0%} of the ceiling).")
    return "\n".join(lines) or None


def load_traces(paths: list[str] | None) -> dict[str, dict]:
    """Trace files (``bench traces``, ``bench speed --traces``) by the name of their trace model."""
    out = {}
    for path in paths or []:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: cannot read traces: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("traces"), dict) or not data.get("trace_model"):
            raise ReportError(f"{path}: not a traces file (expected 'trace_model' and a 'traces' object)")
        out[os.path.basename(os.path.normpath(data["trace_model"]))] = data
    return out


@dataclass
class Roofline:
    seconds: float | None  # roofline time of the row's work; None: unknown, ``why``
    why: str = ""
    from_traces: bool = False  # computed here from a trace file (the row predates roofline_s)


def row_roofline(row: dict, meta: dict, traces: dict[str, dict] | None = None) -> Roofline:
    """The row's recorded ``roofline_s``; for a replayed full-size row without it, the same forward
    model (bench/roofline.py) over the traces it replayed, at this file's ceilings."""
    from types import SimpleNamespace

    from vllm_odb.bench.full_size import FULL_SIZE

    if row.get("roofline_s") is not None:
        return Roofline(row["roofline_s"])
    ceil = meta.get("ceilings") or {}
    peak, bandwidth = ceil.get("bf16_matmul_tflops"), ceil.get("copy_bandwidth_gbs")
    data = (traces or {}).get(row.get("trace_model") or "")
    if not (row["replay"] and row["model"] in FULL_SIZE and data is not None and peak and bandwidth):
        return Roofline(None, "row lacks roofline_s")
    from vllm_odb.bench.roofline import row_seconds
    from vllm_odb.bench.speed import BENCH_METHODS, _trace_key, method_config
    from vllm_odb.checkpoint import ModelSpec

    key = _trace_key(row.get("traces_of", row["method"]), row["gen_length"], row["engine"])  # (speed.replay_method)
    n = row.get("requests") or row["batch"]
    ran = data["traces"].get(key, [])[:n]
    if row["method"] not in BENCH_METHODS or len(ran) < n:
        return Roofline(None, f"row lacks roofline_s, traces lack {n} of {key}")
    knobs = SimpleNamespace(block_length=data.get("block_length", 32), threshold=data.get("threshold", 0.9),
                            ridge_rows=None)
    cfg = method_config(row["method"], row["gen_length"], knobs)
    spec = ModelSpec.from_config(FULL_SIZE[row["model"]]())
    seconds, _ = row_seconds(ran, spec, cfg, row["engine"], row["batch"], peak, bandwidth)
    return Roofline(seconds, from_traces=True)


def _wall_s(row: dict) -> float | None:
    """The row's measured time: its wall clock (from response tokens / tok/s for rows without it)."""
    if row.get("wall_s"):
        return row["wall_s"]
    if row.get("response_tokens") and row["tokens_per_s"] > 0:
        return row["response_tokens"] / row["tokens_per_s"]
    return None


def roofline_cells(row: dict, roof: Roofline) -> list[str]:
    """roofline ms per request, measured time ÷ roofline time, roofline time ÷ measured time
    (= tok/s ÷ roofline tok/s)."""
    if roof.seconds is None:
        return [f"n/a ({roof.why})", "-", "-"]
    wall = _wall_s(row)
    ms = format(1e3 * roof.seconds / (row.get("requests") or row["batch"]), ".1f") + ("*" if roof.from_traces else "")
    if not wall or roof.seconds <= 0:
        return [ms, "n/a (row lacks wall_s)", "-"]
    return [ms, _ratio(wall / roof.seconds), f"{roof.seconds / wall:.0%}"]


def roofline_targets(rows: list[dict], roofs: dict[int, Roofline], model: str) -> list[str]:
    """One line per vLLM method of a full-size model at the goals' gen_length: its batch-1 time
    against BATCH1_TARGET x roofline and its CONCURRENT-request throughput against
    CONCURRENT_TARGET of the roofline throughput."""
    gen, at = _goal_rows(rows, model)
    lines = []
    for method in sorted({r["method"] for r in at if r["engine"] == "vllm"}):
        parts = []
        for batch in (1, CONCURRENT):
            r = _find(at, "vllm", method, batch)
            roof = roofs[id(r)] if r is not None else None
            wall = _wall_s(r) if r is not None else None
            if r is None or roof.seconds is None or not wall:
                why = "no row" if r is None else (roof.why if roof.seconds is None else "row lacks wall_s")
                parts.append(f"batch {batch}: not measured ({why})")
            elif batch == 1:
                x = wall / roof.seconds
                parts.append(f"batch 1 at {_ratio(x)} its roofline time (target <= {BATCH1_TARGET:g}x): "
                             f"{'met' if x <= BATCH1_TARGET + 1e-9 else 'not met'}")
            else:
                share = roof.seconds / wall
                parts.append(f"{batch} concurrent at {share:.0%} of the roofline throughput (target >= "
                             f"{CONCURRENT_TARGET:.0%}): {'met' if share >= CONCURRENT_TARGET - 1e-9 else 'not met'}")
        lines.append(f"- {model} gen {gen}, vllm {method}: " + "; ".join(parts) + ".")
    return lines


REFRESH_TARGET = 0.7  # a refresh forward of REFRESH_TOKENS at least this share of the bf16 peak
REFRESH_TOKENS = (1000, 2000)


def step_efficiency(steps: list[dict], meta: dict) -> list[str]:
    """Per model, engine, method and kind of step (the speed run's sampled step profile): the median
    step time, the median roofline and the median of each step's share of its roofline; for refreshes the share of
    the measured bf16 peak too, and the refresh target (a forward of 1-2k tokens at 70% of the peak)
    over the refreshes of one request of that size."""
    ceil = meta.get("ceilings") or {}
    peak, bw = ceil.get("bf16_matmul_tflops"), ceil.get("copy_bandwidth_gbs")
    if not steps or not peak or not bw:
        return []
    from statistics import median as med

    from vllm_odb.bench.roofline import forward_seconds

    groups: dict = defaultdict(list)
    for st in steps:
        groups[(st["model"], st["engine"], st.get("method", "-"), st["kind"], st["batch"])].append(st)
    body, sized = [], []
    for (model, engine, method, kind, batch), group in sorted(groups.items()):
        roofs = [forward_seconds(g["flops"], g["bytes"], peak, bw) * 1e3 for g in group]
        share = med([r / g["ms"] for r, g in zip(roofs, group)])  # each step's, then the median
        of_peak = med([g["flops"] / (g["ms"] * 1e-3) / (peak * 1e12) for g in group])
        body.append([model, engine, method, kind, batch, f"{med([g['query_tokens'] for g in group]):.0f}", len(group),
                     f"{med([g['ms'] for g in group]):.2f}", f"{med(roofs):.2f}", f"{share:.0%}",
                     f"{of_peak:.0%}" if kind == "refresh" else "-"])
        if kind == "refresh" and batch == 1:
            sized += [(model, method, g) for g in group if REFRESH_TOKENS[0] <= g["query_tokens"] <= REFRESH_TOKENS[1]]
    lines = ["", "## Step efficiency (the sampled step profile: medians)", "",
             *_table(["model", "engine", "method", "kind", "batch", "query tokens", "steps", "ms", "roofline ms",
                      "% roofline", "% bf16 peak"], body)]
    if sized:
        share = med([g["flops"] / (g["ms"] * 1e-3) / (peak * 1e12) for _, _, g in sized])
        status = "met" if share >= REFRESH_TARGET else "not met"
        lines += ["", f"Refresh target: a refresh forward of {REFRESH_TOKENS[0]}-{REFRESH_TOKENS[1]} tokens (one "
                  f"request) at >= {REFRESH_TARGET:.0%} of the bf16 peak: median {share:.0%} over {len(sized)} "
                  f"refreshes ({', '.join(sorted({f'{m} {meth}' for m, meth, _ in sized}))}): {status}."]
    return lines


SPLIT = (("decode", "decode steps"), ("refresh_step", "steps with a refresh"), ("idle", "idle steps"))


def wall_split(rows: list[dict]) -> list[str]:
    """The rows' wall time per request by kind of engine step (``bench speed``'s ``step_split``,
    vLLM rows recorded since session 12): where the time beyond the roofline sits."""
    have = [r for r in rows if "steps_per_request" in r]
    if not have:
        return []
    body = []
    for r in have:
        cells = [f"{1e3 * r[f'{k}_s_per_request']:.1f} ms / {r[f'{k}_steps_per_request']:g}" for k, _ in SPLIT]
        graphed = f"{r['refresh_graphed']:.0%}" if isinstance(r.get("refresh_graphed"), (int, float)) else "-"
        alloc = (f"{r['alloc_retries_per_request']:g} / {r['device_mallocs_per_request']:g}"
                 if "alloc_retries_per_request" in r and "device_mallocs_per_request" in r else "-")
        body.append([r["model"], _engine_label(r), r["method"], r["gen_length"], r["batch"],
                     f"{r['steps_per_request']:g}", *cells, f"{1e3 * r['untimed_s_per_request']:.1f} ms",
                     graphed, alloc])
    return ["", "## Where the wall went, per request (engine steps by kind: time / count)", "",
            *_table(["model", "engine", "method", "gen", "batch", "steps", *(h for _, h in SPLIT), "no step",
                     "refresh tokens graphed", "allocator retries / cudaMallocs"], body),
            "", "Refresh tokens graphed: the share whose refresh forwards replayed CUDA graphs. Allocator: the "
            "caching allocator's retries (a device sync each) and cudaMallocs per request (- : not recorded)."]


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]


def build_markdown(data: dict, title: str, plots: list[str] | None = None, skipped: list[str] | None = None,
                   traces: dict[str, dict] | None = None) -> str:
    """The summary: run metadata, the rows table (with each row's roofline), notes, the goals
    table, the roofline targets and the plots (paths as given). ``traces`` (``load_traces``) give
    the roofline of replayed rows written before speed recorded it."""
    meta, rows = data["meta"], data["rows"]
    roofs = {id(r): row_roofline(r, meta, traces) for r in rows}
    lines = [f"# Speed benchmark: {title}", ""]
    ceil = meta.get("ceilings") or {}
    facts = [f"device {meta['device']}"] if meta.get("device") else []
    facts += [f"{label} {ceil[key]:g} {unit}" for key, label, unit in
              [("bf16_matmul_tflops", "bf16 matmul", "TFLOP/s"), ("copy_bandwidth_gbs", "copy", "GB/s"),
               ("ridge_flop_per_byte", "ridge", "FLOP/byte")] if ceil.get(key) is not None]
    if facts:
        lines += [", ".join(facts) + ".", ""]
    if meta.get("commands"):
        lines += ["```bash", *map(str, meta["commands"]), "```", ""]

    lines += ["## Rows", ""]
    order = sorted(rows, key=lambda r: (r["model"], r["gen_length"], r["batch"], _engine_label(r), r["method"],
                                        r["replay"]))
    if order:
        body = [[r["model"], (f"yes ({r['trace_model']})" if r.get("trace_model") else "yes") if r["replay"] else "no",
                 _engine_label(r), r["method"], r["gen_length"], r["batch"], *(_fmt(r.get(k), f) for _, k, f in COLUMNS),
                 *roofline_cells(r, roofs[id(r)])] for r in order]
        lines += _table(["model", "replay", "engine", "method", "gen", "batch", *(h for h, _, _ in COLUMNS),
                         *ROOFLINE_COLUMNS], body)
        lines += ["", ROOFLINE_NOTE + (TRACES_NOTE if any(x.from_traces for x in roofs.values()) else "")
                  + (NA_NOTE if any(x.seconds is None for x in roofs.values()) else "")]
        notes = [f"- {r['model']} {_engine_label(r)} {r['method']} gen {r['gen_length']} batch {r['batch']}: {r['note']}"
                 for r in order if r.get("note")]
        lines += ["", *notes] if notes else []
    else:
        lines.append("No rows.")

    lines += wall_split(order)
    lines += step_efficiency(data.get("steps") or [], meta)

    lines += ["", "## Goals", ""]
    models = full_size_models(rows)
    if not models:
        lines.append("No full-size model rows: goals not measured.")
    body, fallbacks, ceilings = [], [], []
    for model in models:
        gen, model_goals = goals(rows, model)
        bound = concurrency_ceiling(rows, model, gen, meta)
        if bound:
            ceilings.append(bound)
        if gen is None:
            fallbacks.append(f"- {model}: no replayed rows.")
        elif gen != GOAL_GEN:
            fallbacks.append(f"- {model}: no replayed rows at gen_length {GOAL_GEN}; "
                             f"used the largest present, {gen}.")
        body += [[model, _fmt(gen, "d"), g.name, "-" if g.value is None else _ratio(g.value),
                  f"{'>=' if g.at_least else '<='} {g.target:g}x", g.status, g.source] for g in model_goals]
    if body:
        lines += ["Replayed rows only; every ratio is between rows of this file.", ""]
        lines += _table(["model", "gen", "goal", "measured", "target", "status", "from"], body)
        lines += ["", *fallbacks] if fallbacks else []
    if ceilings:
        lines += ["", f"Compute ceiling of the {CONCURRENT}-concurrent goal (refresh FLOPs of a request / the "
                  "measured bf16 matmul peak; prompt prefill and decode steps excluded, so a true ceiling is lower):",
                  "", *ceilings]
    targets = [line for model in models for line in roofline_targets(rows, roofs, model)]
    if targets:
        lines += ["", (f"Roofline targets (batch 1 <= {BATCH1_TARGET:g}x its roofline time; {CONCURRENT} concurrent "
                       f">= {CONCURRENT_TARGET:.0%} of the roofline throughput), replayed rows at the goals' "
                       "gen_length:"), "", *targets]

    if plots or skipped:
        lines += ["", "## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})\n" for p in plots or []]
        lines += [f"- skipped {s}" for s in skipped or []]
    return "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _line_label(r: dict) -> str:
    return f"{_engine_label(r)} {r['method']}" + (" (replay)" if r["replay"] else "")


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _series_plot(rows: list[dict], x_key: str, x_label: str, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lines = defaultdict(dict)
    for r in rows:
        lines[_line_label(r)].setdefault(r[x_key], r["tokens_per_s"])
    for label, points in sorted(lines.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    xs = sorted({r[x_key] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(x_label)
    ax.set_ylabel("tokens/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _roofline(steps: list[dict], peak_tflops: float, bandwidth_gbs: float, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ridge = peak_tflops * 1e3 / bandwidth_gbs  # FLOP/byte where the two ceilings meet
    ai = [s["flops"] / s["bytes"] for s in steps]
    lo, hi = min(ai + [ridge]) / 4, max(ai + [ridge]) * 4
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(xs, [min(peak_tflops, bandwidth_gbs * x / 1e3) for x in xs], color="black", lw=1.5,
            label=f"roofline ({peak_tflops:g} TFLOP/s, {bandwidth_gbs:g} GB/s)")
    ax.axvline(ridge, color="gray", ls="--", lw=1)
    ax.annotate(f"ridge {ridge:.0f} FLOP/byte", (ridge, 0.02), xycoords=("data", "axes fraction"),
                textcoords="offset points", xytext=(4, 0), fontsize=8, color="gray")
    kinds = sorted({s["kind"] for s in steps})
    markers = dict(zip(sorted({s["engine"] for s in steps}), "os^Dv<>"))
    for ci, kind in enumerate(kinds):
        for engine, marker in markers.items():
            group = [s for s in steps if s["kind"] == kind and s["engine"] == engine]
            if not group:
                continue
            x = [s["flops"] / s["bytes"] for s in group]
            y = [s["flops"] / (s["ms"] * 1e9) for s in group]
            ax.scatter(x, y, color=f"C{ci}", marker=marker, label=f"{kind} ({engine})", zorder=3)
            for s, xi, yi in zip(group, x, y):
                ax.annotate(f"b{s['batch']}/q{s['query_tokens']}", (xi, yi), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    _save(fig, path)


def write_plots(data: dict, out_dir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Write the PNGs; returns the files written and a 'name: reason' line for each plot skipped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in data["rows"] if r["tokens_per_s"] > 0]  # log axes
    written, skipped = [], []
    models = sorted({r["model"] for r in data["rows"]} | {s["model"] for s in data["steps"]})
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        for gen in sorted({r["gen_length"] for r in mine}):
            at = [r for r in mine if r["gen_length"] == gen]
            name = f"throughput_vs_batch_{_slug(model)}_g{gen}.png"
            if len({r["batch"] for r in at}) < 2:
                skipped.append(f"{name}: one batch size only")
                continue
            _series_plot(at, "batch", "batch (concurrent requests)", f"{model}, gen_length {gen}", out / name)
            written.append(out / name)
        name = f"throughput_vs_gen_{_slug(model)}_b1.png"
        b1 = [r for r in mine if r["batch"] == 1]
        if len({r["gen_length"] for r in b1}) < 2:
            skipped.append(f"{name}: fewer than two gen lengths at batch 1")
        else:
            _series_plot(b1, "gen_length", "gen_length", f"{model}, batch 1", out / name)
            written.append(out / name)
        name = f"roofline_{_slug(model)}.png"
        steps = [s for s in data["steps"] if s["model"] == model and min(s["ms"], s["flops"], s["bytes"]) > 0]
        ceil = data["meta"].get("ceilings") or {}
        peak, bandwidth = ceil.get("bf16_matmul_tflops"), ceil.get("copy_bandwidth_gbs")
        if not steps:
            skipped.append(f"{name}: no steps")
        elif not peak or not bandwidth:
            skipped.append(f"{name}: meta.ceilings lacks bf16_matmul_tflops or copy_bandwidth_gbs")
        else:
            _roofline(steps, peak, bandwidth, f"{model}: per-step roofline ({data['meta'].get('device', '?')})",
                      out / name)
            written.append(out / name)
    return written, skipped


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("results", help="JSON written by `python -m vllm_odb.bench speed`")
    ap.add_argument("--out-dir", default=None, help="folder for the PNG plots (none written without it)")
    ap.add_argument("--md", default=None, help="markdown file to write (default: stdout)")
    ap.add_argument("--traces", action="append", default=None,
                    help="traces JSON the replayed rows ran (bench speed --traces); gives the roofline of rows "
                         "written before speed recorded roofline_s (repeat for several trace models)")


def main(args: argparse.Namespace) -> int:
    try:
        data = load_results(args.results)
        traces = load_traces(getattr(args, "traces", None))
        written, skipped = [], []
        if args.out_dir:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ReportError("--out-dir needs matplotlib (pip install matplotlib)") from None
            written, skipped = write_plots(data, args.out_dir)
        for p in written:
            print(f"wrote {p}", file=sys.stderr)
        for s in skipped:
            print(f"skipped {s}", file=sys.stderr)
        base = Path(args.md).resolve().parent if args.md else Path.cwd()
        links = [os.path.relpath(p.resolve(), base) for p in written]
        text = build_markdown(data, Path(args.results).name, links, skipped, traces)
        if args.md:
            Path(args.md).write_text(text)
            print(f"wrote {args.md}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    except (ReportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
