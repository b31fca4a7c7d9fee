"""Jump-share's draft-row kernel (engine/draft_attention.py) at LLaDA-8B shapes, per tile size,
warps and key splits.

At batch 1 the kernel runs heads x row tiles programs (32 x 5 with 32-row tiles), each streaming all
of the request's keys: too few to fill an H200, hence the key splits (``VLLM_ODB_DRAFT_SPLITS``). This
times one step's 32 layers of the kernel, captured in a CUDA graph as the engine runs it (so Python's
launch cost is not timed), for each configuration in ``CONFIGS``, on the batch shapes a jump-share
engine plans at a budget of ``RIDGE`` rows (default 128, the engine's default on the H100 and H200
since session 15; session 10 ran 178); checks every one against the SDPA route on the real draft
rows, and writes the table to $OUT/draft_tiles.json. A configuration is ``VLLM_ODB_DRAFT_TILES``
(m,n[,warps[,stages]]) and ``VLLM_ODB_DRAFT_SPLITS``.

    source /root/vllm-env.sh && RIDGE=128 python3 scripts/gpu_draft_tiles.py
"""

from __future__ import annotations

import json
import os
import sys
import types

import torch

sys.path.insert(0, os.getcwd())

from vllm_odb.engine import draft_attention  # noqa: E402
from vllm_odb.engine.model_state import BranchAttention, BranchBatch, BranchRows, PagedCache  # noqa: E402
from vllm_odb.engine.requests import JumpPlan  # noqa: E402
from vllm_odb.policies import DecodeConfig  # noqa: E402

MASK, HEADS, DIM, KBS, BLOCKS, LAYERS = 99, 32, 128, 16, 2048, 32
# (VLLM_ODB_DRAFT_TILES, VLLM_ODB_DRAFT_SPLITS): "" is the default
# (session 10 on the H200: 8 warps slower everywhere; 32 x 64 with 4 splits the default; 64 x 64 best for
# 700 keys; here also fewer, wider row tiles, which read the keys fewer times, and the loop's stages)
CONFIGS = [("32,64", "2"), ("32,64", "4"), ("32,64", "8"), ("64,64", "4"), ("64,64", "8"), ("64,32", "8"),
           ("128,32,8", "8"), ("16,64", "4"), ("32,64,4,2", "4"), ("32,64,4,4", "4"), ("64,64,4,2", "8"), ("", "")]
RIDGE = int(os.environ.get("RIDGE", "128"))
REPLAYS = 20


def graph_ms(step) -> float:
    """``step`` (already compiled and warm) captured in a CUDA graph: ms a replay, over REPLAYS."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / REPLAYS


def plans(batch: int, masked: float, seed: int) -> list[JumpPlan]:
    """``batch`` requests' plans at a budget of RIDGE rows shared, blocks of 32."""
    cfg = DecodeConfig(gen_length=1024, block_length=32, jump=True, rule="threshold", cache="dual", ridge_rows=RIDGE)
    width = max(32, RIDGE // batch)
    out = []
    for i in range(batch):
        g = torch.Generator().manual_seed(seed + i)
        block = torch.where(torch.rand(32, generator=g) < masked, MASK, 5).cuda()
        block[:2] = MASK
        out.append(JumpPlan.plan(block, torch.zeros(0, dtype=torch.long, device="cuda"),
                                 torch.randint(0, 50, (32,), generator=g).cuda(), torch.rand(32, generator=g).cuda(),
                                 MASK, cfg, batch, width))
    return out


def case(name: str, batch: int, masked: float, end: int) -> dict:
    torch.manual_seed(0)
    ps = plans(batch, masked, seed=batch * 10)
    firsts, row = [], 0
    for p in ps:
        firsts.append(row)
        row += p.num_rows
    rows = [BranchRows(first=f, plan=p, q0=end - 200, end=end) for f, p in zip(firsts, ps)]
    query = torch.randn(row, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    key = torch.randn(row, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    value = torch.randn(row, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    cache = torch.randn(BLOCKS, HEADS, KBS, 2 * DIM, device="cuda", dtype=torch.bfloat16)
    tables = torch.stack([torch.randperm(BLOCKS, device="cuda")[:128] for _ in ps]).int()
    layer = types.SimpleNamespace(num_heads=HEADS, num_kv_heads=HEADS, head_size=DIM,
                                  impl=types.SimpleNamespace(scale=DIM ** -0.5))
    drafts = [int(p.drafts) for p in ps]
    real = torch.zeros(row, dtype=torch.bool, device="cuda")
    for f, p, d in zip(firsts, ps, drafts):
        real[f + p.window:f + p.window + d] = True

    def run(kernel: bool) -> tuple[torch.Tensor, float]:
        wrapper = BranchAttention(lambda *a, **k: None, PagedCache(kernel_block_size=KBS))
        wrapper.batches = BranchBatch.build(rows, tables, KBS, "cuda", kernel=kernel)
        out = torch.zeros(row, HEADS * DIM, device="cuda", dtype=torch.bfloat16)

        def step():
            for _ in range(LAYERS):
                wrapper(layer, query, key, value, cache, object(), out)

        step()  # compile, warm
        torch.cuda.synchronize()
        if not kernel:  # the reference rows only (SDPA's route is not what is timed)
            return out, float("nan")
        return out, graph_ms(step)

    want, sdpa_ms = run(False)
    res = {"case": name, "requests": batch, "keys": end, "draft_rows": drafts, "sdpa_ms": round(sdpa_ms, 3),
           "configs": {}}
    for tiles, splits in CONFIGS:
        for env, val in ((draft_attention.TILES_ENV, tiles), (draft_attention.SPLITS_ENV, splits)):
            if val:
                os.environ[env] = val
            else:
                os.environ.pop(env, None)
        got, ms = run(True)
        err = float((got[real].float() - want[real].float()).abs().max())
        res["configs"][f"tiles={tiles or 'default'} splits={splits or 'default'}"] = {
            "ms": round(ms, 3), "max_abs_err": round(err, 4)}
    for env in (draft_attention.TILES_ENV, draft_attention.SPLITS_ENV):
        os.environ.pop(env, None)
    print(json.dumps(res), flush=True)
    return res


def buffers_case(name: str, tokens: int, batch: int, end: int) -> dict:
    """The FULL-graph launch: ``DraftBuffers`` of a 64-request engine (window 32, 146 draft rows),
    the kernel over the tiles a step of ``tokens`` rows can need (``tiles_bound``); ``batch`` planned
    requests' layout filled in (0: a step with no plan, as at batch 8 and up), 32 layers replayed."""
    torch.manual_seed(0)
    buffers = draft_attention.DraftBuffers(64, 146, 32, 128, "cuda")
    query, key, value = (torch.randn(tokens, HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cache = torch.randn(BLOCKS, HEADS, KBS, 2 * DIM, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(tokens, HEADS * DIM, device="cuda", dtype=torch.bfloat16)
    if batch:
        ps = plans(batch, 0.5, seed=7)
        firsts = list(range(0, batch * ps[0].num_rows, ps[0].num_rows))
        rows = [BranchRows(first=f, plan=p, q0=end - 200, end=end) for f, p in zip(firsts, ps)]
        tables = torch.stack([torch.randperm(BLOCKS, device="cuda")[:128] for _ in ps]).int()
        buffers.fill(BranchBatch.build(rows, tables, KBS, "cuda", kernel=True)[0].kernel)

    def step():
        for _ in range(LAYERS):
            draft_attention.draft_rows_attention(query, key, value, cache, out, buffers.rows, DIM ** -0.5, KBS)

    step()  # compile, warm
    torch.cuda.synchronize()
    res = {"case": name, "tokens": tokens, "requests": batch, "keys": end,
           "tiles": draft_attention.tiles_bound(tokens, 32, buffers.rows.block_m), "ms": round(graph_ms(step), 3)}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    rows = [case("batch 1, 700 keys", 1, 0.5, 700), case("batch 1, 1300 keys", 1, 0.5, 1300),
            case("batch 3, 700 keys", 3, 0.5, 700), case("batch 1, 1300 keys, few masks", 1, 0.25, 1300)]
    graphs = [buffers_case("FULL graph, batch 1 (175 rows)", 175, 1, 1300),
              buffers_case("FULL graph, batch 3 (177 rows)", 177, 3, 1300),
              buffers_case("FULL graph, no plan (256 rows)", 256, 0, 1300),
              buffers_case("FULL graph, no plan (2048 rows)", 2048, 0, 1300)]
    with open(os.path.join(out, "draft_tiles.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "layers": LAYERS, "ridge_rows": RIDGE, "rows": rows,
                   "graphs": graphs}, f,
                  indent=1)


if __name__ == "__main__":
    main()
