"""Jump-share's draft rows in one kernel a layer: attention of each planned request's draft rows
over its keys in vLLM's paged cache and the draft rows' own keys of this step, under the branch
layout's mask (engine/model_state.py ``BranchAttention`` says which keys a draft row reads).

One Triton program takes a tile of ``BLOCK_M`` draft rows of one request (``tile_map``), one head
and one key split (``draft_splits``). Without splits it streams the request's keys ``[0, end)``
from the paged cache through its block table, then the draft rows' own keys from this step's
key/value rows, with an online softmax in fp32. With ``s`` splits, each of ``s`` programs streams
a range of the cache's keys and one more takes the draft keys. Each writes fp32 partials, and
``_merge_kernel`` joins them. Nothing is gathered or materialised on the side (``BranchBatch``'s
SDPA route copies every key of the sequence per layer).
The mask has two parts, both from ``JumpPlan.attn``: over the base window ``[q0, q0 + window)``
(``mask_w``) and over the draft keys (``mask_d``); every other key below ``end`` is visible.

``VLLM_ODB_DRAFT_ATTENTION`` picks the route: ``auto`` (the default) takes the kernel on CUDA for a
bf16/fp16 model and the SDPA route otherwise; ``triton`` and ``sdpa`` force one. In fp32 the kernel
multiplies in IEEE fp32 (exact enough for token parity, but Triton emulates it: 25x slower than SDPA
at full size), hence SDPA there by default. Measured on the H200 (BENCHMARKS.md, "Jump-share's draft
rows on the GPU"): token parity with the reference in fp32 under eager and CUDA graphs, both models,
alone and batched; 16 ms against the SDPA route's 51 ms for 7 requests' draft rows over 32 layers
at LLaDA-8B shapes in bf16.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

from vllm_odb.policies.host import to_device

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - vLLM installs triton; a bare CPU install may not
    triton = None

ENV = "VLLM_ODB_DRAFT_ATTENTION"


def kernel_selected(device, dtype: torch.dtype | None = None) -> bool:
    """Whether the draft rows of a model in ``dtype`` on ``device`` take the Triton kernel:
    ``VLLM_ODB_DRAFT_ATTENTION`` ``auto`` (default: on CUDA for bf16/fp16 when triton is installed),
    ``triton`` (on CUDA, or anywhere under ``TRITON_INTERPRET=1``) or ``sdpa`` (never). Any other
    value is refused by name."""
    choice = os.environ.get(ENV, "auto")
    if choice not in ("auto", "sdpa", "triton"):
        raise ValueError(f"{ENV}={choice!r}: give 'auto', 'sdpa' or 'triton'")
    if choice == "triton" and triton is None:
        raise RuntimeError(f"{ENV}=triton needs the triton package")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "auto":
        return on_cuda and triton is not None and dtype in (torch.bfloat16, torch.float16)
    return choice == "triton" and (on_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@dataclass
class DraftRows:
    """A step's planned requests for the kernel (``R`` requests, at most ``D`` draft rows each)."""

    block_tables: torch.Tensor  # [R, blocks] kernel blocks of each request
    rows: torch.Tensor  # [R, D] batch row of each draft row (padding: a real one, not written)
    n_draft: torch.Tensor  # [R] int32 draft rows
    ends: torch.Tensor  # [R] int32 keys in the cache (prompt + live canvas)
    q0: torch.Tensor  # [R] int32 position of window offset 0
    window: torch.Tensor  # [R] int32 base rows
    mask_w: torch.Tensor  # [R, D, W] int8: draft row m reads window key q0 + j
    mask_d: torch.Tensor  # [R, D, D] int8: draft row m reads draft key j
    max_draft: int
    slots: np.ndarray | None = None  # [R] host: each request's draft slots (real rows, then padding)
    tiles: torch.Tensor | None = None  # [T, 2] int32 (request, first draft row) of each row tile; -1: unused
    block_m: int = 0  # draft rows a tile takes (``draft_tiles``)
    graph_window: int = 0  # DraftBuffers' rows: the engine's window, for the launch's tile bound


def tile_map(slots, block_m: int) -> np.ndarray:
    """[T, 2] (request, first draft row) of every tile of ``block_m`` draft rows that the requests'
    draft ``slots`` need, request by request. The kernel runs a program per tile (and head, and key
    split), so a batch's programs follow its draft rows, not the most requests an engine holds."""
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    per = -(-slots // block_m)
    req = np.repeat(np.arange(len(slots)), per)
    first = (np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per)) * block_m
    return np.stack([req, first], 1).reshape(-1, 2)


def tiles_bound(tokens: int, window: int, block_m: int) -> int:
    """The most row tiles any layout of a step of ``tokens`` query rows can need: each planned
    request takes its ``window`` base rows and at least one draft row among the tokens, and adds
    at most ``block_m - 1`` rows of tile padding. The tile count of a FULL CUDA graph's launch."""
    most = tokens // (window + 1)
    if most == 0:
        return 0
    return max((tokens - n * window + n * (block_m - 1)) // block_m for n in (1, most))


class DraftBuffers:
    """The kernel's inputs at fixed addresses and sizes, for jump-share steps captured in FULL CUDA
    graphs (``VLLM_ODB_JUMP_GRAPHS=full``; engine/knobs.py): room for ``capacity`` planned requests
    of at most ``max_draft`` draft rows, with the engine's ``window`` (every step's), block tables
    ``blocks`` wide. A step's layout (``DraftRows``) is copied in, and its row tiles (``tile_map``) in the
    buffers' own tile size; every tile past them is unused (-1), so the launch captured over a
    graph's tile bound (``tiles_bound`` of its token rows) skips them at once. Stale rows, masks and
    tables past a slot's draft count are never read: the kernel reads draft row ``m`` and draft key
    ``j`` below that count only, and the window mask inside that slot's own window."""

    def __init__(self, capacity: int, max_draft: int, window: int, blocks: int, device):
        i32 = {"dtype": torch.int32, "device": device}
        block_m = draft_tiles(max_draft)[0]
        self.rows = DraftRows(
            block_tables=torch.zeros((capacity, blocks), **i32),
            rows=torch.zeros((capacity, max_draft), dtype=torch.long, device=device),
            n_draft=torch.zeros(capacity, **i32), ends=torch.zeros(capacity, **i32),
            q0=torch.zeros(capacity, **i32), window=torch.zeros(capacity, **i32),
            mask_w=torch.zeros((capacity, max_draft, window), dtype=torch.int8, device=device),
            mask_d=torch.zeros((capacity, max_draft, max_draft), dtype=torch.int8, device=device),
            max_draft=max_draft, tiles=torch.full((capacity * -(-max_draft // block_m), 2), -1, **i32),
            block_m=block_m, graph_window=window)
        self._unused = np.full(self.rows.tiles.shape, -1, dtype=np.int64)

    def clear(self) -> None:
        """No draft rows this step."""
        self.rows.n_draft.zero_()

    def fill(self, d: DraftRows) -> None:
        """This step's layout ``d`` in place of the last one's."""
        p = self.rows
        r, dd = d.rows.shape
        b, w = d.block_tables.shape[1], d.mask_w.shape[2]
        if r > p.rows.shape[0] or dd > p.max_draft or w > p.mask_w.shape[2] or b > p.block_tables.shape[1]:
            raise RuntimeError(f"vllm-odb: a step's draft rows ({r} requests, {dd} rows, window {w}, {b} blocks) "
                               f"outgrow the captured buffers ({p.rows.shape[0]}, {p.max_draft}, "
                               f"{p.mask_w.shape[2]}, {p.block_tables.shape[1]})")
        if w != p.graph_window:  # the captured launches' tile bound counts on the engine's one window
            raise RuntimeError(f"vllm-odb: a step's window ({w} rows) is not the captured buffers' ({p.graph_window})")
        tiles = self._unused.copy()
        mine = tile_map(d.slots, p.block_m)
        tiles[:len(mine)] = mine
        p.tiles.copy_(to_device(tiles, p.tiles.device, torch.int32), non_blocking=True)
        p.n_draft.zero_()
        for mine, theirs in ((p.n_draft, d.n_draft), (p.ends, d.ends), (p.q0, d.q0), (p.window, d.window)):
            mine[:r].copy_(theirs)
        p.block_tables[:r, :b].copy_(d.block_tables)
        p.rows[:r, :dd].copy_(d.rows)
        p.mask_w[:r, :dd, :w].copy_(d.mask_w)
        p.mask_d[:r, :dd, :dd].copy_(d.mask_d)


if triton is not None:

    @triton.jit
    def _attend(q, k, v, seen, m_i, l_i, acc, scale, IEEE: tl.constexpr):
        """One key tile into the online softmax: scores of the seen keys, the running max ``m_i``,
        sum ``l_i`` and output ``acc`` (fp32) rescaled to it. A row that has seen nothing yet
        keeps zeros (its max stays -inf)."""
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(seen, s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - base[:, None])
        alpha = tl.exp(m_i - base)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + pv

    @triton.jit
    def _cache_keys(q, m, m_ok, c, c_ok, lo, hi, q0, win, kh, cache_ptr, bt_ptr, mw_ptr, sc_b, sc_h, sc_n,
                    s_mw_m, kbs, dim, scale, m_i, l_i, acc, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Keys ``[lo, hi)`` of the request's paged cache (``bt_ptr``: its block table row): every
        one outside the window ``[q0, q0 + win)``, the window's where its mask row (``mw_ptr``) says."""
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            blk = tl.load(bt_ptr + n // kbs, mask=n_ok, other=0).to(tl.int64)
            at = cache_ptr + blk[:, None] * sc_b + kh * sc_h + (n % kbs)[:, None] * sc_n + c[None]
            k = tl.load(at, mask=n_ok[:, None] & c_ok[None], other=0.0)
            v = tl.load(at + dim, mask=n_ok[:, None] & c_ok[None], other=0.0)
            in_w = (n >= q0) & (n < q0 + win)
            out_w = (n < q0) | (n >= q0 + win)
            mw = tl.load(mw_ptr + m[:, None] * s_mw_m + (n - q0)[None], mask=m_ok[:, None] & in_w[None] & n_ok[None],
                         other=0)
            seen = n_ok[None] & (out_w[None] | (mw != 0))
            m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, scale, IEEE)
        return m_i, l_i, acc

    @triton.jit
    def _draft_keys(q, m, m_ok, c, c_ok, nd, kh, k_ptr, v_ptr, rows_ptr, md_ptr, sk_t, sk_h, sv_t, sv_h, s_md_m,
                    scale, m_i, l_i, acc, IEEE: tl.constexpr, BLOCK_N: tl.constexpr):
        """The draft rows' own keys of this step (``rows_ptr``: the request's batch rows), where its
        mask rows (``md_ptr``) say."""
        for start in range(0, nd, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            j_ok = j < nd
            krow = tl.load(rows_ptr + j, mask=j_ok, other=0)
            kv_ok = j_ok[:, None] & c_ok[None]
            k = tl.load(k_ptr + krow[:, None] * sk_t + kh * sk_h + c[None], mask=kv_ok, other=0.0)
            v = tl.load(v_ptr + krow[:, None] * sv_t + kh * sv_h + c[None], mask=kv_ok, other=0.0)
            md = tl.load(md_ptr + m[:, None] * s_md_m + j[None], mask=m_ok[:, None] & j_ok[None], other=0)
            m_i, l_i, acc = _attend(q, k, v, md != 0, m_i, l_i, acc, scale, IEEE)
        return m_i, l_i, acc

    # Triton specialises integer arguments (equal to 1, divisible by 16) and compiles once per
    # combination: the strides below follow the step's plans (draft rows per request), which change
    # with the batch (knobs.step_width), so each new combination would stall a step for a compile.
    @triton.jit(do_not_specialize=["s_rows", "s_mw_r", "s_mw_m", "s_md_r", "s_md_m"])
    def _draft_rows_kernel(
        q_ptr, k_ptr, v_ptr, cache_ptr, out_ptr, part_ptr, ml_ptr,
        tiles_ptr, bt_ptr, rows_ptr, nd_ptr, end_ptr, q0_ptr, win_ptr, mw_ptr, md_ptr,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_b, sc_h, sc_n, so_t,
        s_bt, s_rows, s_mw_r, s_mw_m, s_md_r, s_md_m,
        scale, kbs, group, dim, heads,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        r = tl.load(tiles_ptr + 2 * t)  # the tile's request (-1: an unused tile), and its first draft row
        m0 = tl.load(tiles_ptr + 2 * t + 1)
        nd = tl.load(nd_ptr + tl.maximum(r, 0))
        if (r >= 0) & (m0 < nd):
            i = tl.arange(0, BLOCK_M)
            m = m0 + i
            m_ok = m < nd
            c = tl.arange(0, HEAD_D)
            c_ok = c < dim
            rows_r = rows_ptr + r * s_rows
            row = tl.load(rows_r + m, mask=m_ok, other=0)
            q = tl.load(q_ptr + row[:, None] * sq_t + h * sq_h + c[None], mask=m_ok[:, None] & c_ok[None], other=0.0)
            kh = h // group
            end = tl.load(end_ptr + r)
            q0 = tl.load(q0_ptr + r)
            win = tl.load(win_ptr + r)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
            bt_r = bt_ptr + r * s_bt
            mw_r = mw_ptr + r * s_mw_r
            md_r = md_ptr + r * s_md_r
            if SPLITS == 1:  # one program: all the keys, then the output
                m_i, l_i, acc = _cache_keys(q, m, m_ok, c, c_ok, 0, end, q0, win, kh, cache_ptr, bt_r, mw_r, sc_b,
                                            sc_h, sc_n, s_mw_m, kbs, dim, scale, m_i, l_i, acc, IEEE, BLOCK_N)
                m_i, l_i, acc = _draft_keys(q, m, m_ok, c, c_ok, nd, kh, k_ptr, v_ptr, rows_r, md_r, sk_t, sk_h,
                                            sv_t, sv_h, s_md_m, scale, m_i, l_i, acc, IEEE, BLOCK_N)
                o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
                tl.store(out_ptr + row[:, None] * so_t + h * dim + c[None], o.to(out_ptr.dtype.element_ty),
                         mask=m_ok[:, None] & c_ok[None])
            else:  # split s of the cache's keys (s == SPLITS: the draft keys), a partial for _merge_kernel
                if s < SPLITS:
                    chunk = tl.cdiv(tl.cdiv(end, SPLITS), BLOCK_N) * BLOCK_N
                    lo = s * chunk
                    m_i, l_i, acc = _cache_keys(q, m, m_ok, c, c_ok, lo, tl.minimum(end, lo + chunk), q0, win, kh,
                                                cache_ptr, bt_r, mw_r, sc_b, sc_h, sc_n, s_mw_m, kbs, dim, scale,
                                                m_i, l_i, acc, IEEE, BLOCK_N)
                else:
                    m_i, l_i, acc = _draft_keys(q, m, m_ok, c, c_ok, nd, kh, k_ptr, v_ptr, rows_r, md_r, sk_t, sk_h,
                                                sv_t, sv_h, s_md_m, scale, m_i, l_i, acc, IEEE, BLOCK_N)
                at = ((t * BLOCK_M + i).to(tl.int64) * heads + h) * (SPLITS + 1) + s  # int64: scratch may be big
                tl.store(ml_ptr + 2 * at, m_i, mask=m_ok)
                tl.store(ml_ptr + 2 * at + 1, l_i, mask=m_ok)
                tl.store(part_ptr + at[:, None] * HEAD_D + c[None], acc, mask=m_ok[:, None])

    @triton.jit(do_not_specialize=["s_rows"])
    def _merge_kernel(out_ptr, part_ptr, ml_ptr, tiles_ptr, rows_ptr, nd_ptr, so_t, s_rows, dim, heads,
                      BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, SPLITS: tl.constexpr):
        """The draft rows' outputs from their ``SPLITS + 1`` partials (running max, sum, output)."""
        t = tl.program_id(0)
        h = tl.program_id(1)
        r = tl.load(tiles_ptr + 2 * t)
        m0 = tl.load(tiles_ptr + 2 * t + 1)
        nd = tl.load(nd_ptr + tl.maximum(r, 0))
        if (r >= 0) & (m0 < nd):
            i = tl.arange(0, BLOCK_M)
            m_ok = m0 + i < nd
            c = tl.arange(0, HEAD_D)
            first = ((t * BLOCK_M + i).to(tl.int64) * heads + h) * (SPLITS + 1)
            top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            for s in tl.static_range(SPLITS + 1):
                top = tl.maximum(top, tl.load(ml_ptr + 2 * (first + s), mask=m_ok, other=float("-inf")))
            base = tl.where(top == float("-inf"), 0.0, top)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
            for s in tl.static_range(SPLITS + 1):
                w = tl.exp(tl.load(ml_ptr + 2 * (first + s), mask=m_ok, other=float("-inf")) - base)
                l_i += w * tl.load(ml_ptr + 2 * (first + s) + 1, mask=m_ok, other=0.0)
                acc += w[:, None] * tl.load(part_ptr + (first + s)[:, None] * HEAD_D + c[None], mask=m_ok[:, None],
                                            other=0.0)
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            row = tl.load(rows_ptr + r * s_rows + m0 + i, mask=m_ok, other=0)
            tl.store(out_ptr + row[:, None] * so_t + h * dim + c[None], o.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & (c < dim)[None])


TILES_ENV = "VLLM_ODB_DRAFT_TILES"
SPLITS_ENV = "VLLM_ODB_DRAFT_SPLITS"


def _tiles_knob() -> tuple[int, int, int, int | None] | None:
    """``VLLM_ODB_DRAFT_TILES=m,n[,warps[,stages]]``, parsed and checked (None: unset)."""
    override = os.environ.get(TILES_ENV, "").strip()
    if not override:
        return None
    try:
        vals = [int(x) for x in override.split(",")]
    except ValueError:
        vals = []
    if len(vals) == 2:
        vals.append(4)
    if len(vals) == 3:
        vals.append(None)
    if len(vals) != 4 or vals[0] not in (16, 32, 64, 128) or vals[1] not in (16, 32, 64, 128) \
            or vals[2] not in (1, 2, 4, 8) or vals[3] not in (None, 1, 2, 3, 4, 5):
        raise ValueError(f"{TILES_ENV}={override!r}: give 'm,n', 'm,n,warps' or 'm,n,warps,stages', m and n "
                         f"each of 16, 32, 64 or 128, warps of 1, 2, 4 or 8, stages of 1 to 5")
    return vals[0], vals[1], vals[2], vals[3]


def draft_tiles(max_draft: int) -> tuple[int, int]:
    """The kernel's (BLOCK_M, BLOCK_N): draft rows and keys a program takes at a time. Wider row
    tiles read the keys fewer times but leave fewer programs to fill the GPU (at batch 1: heads x
    row tiles, times the key splits of ``draft_splits``). ``VLLM_ODB_DRAFT_TILES=m,n[,warps]``
    overrides them (benchmarks: scripts/gpu_draft_tiles.py). Measured on the H200 at LLaDA-8B shapes
    (BENCHMARKS.md, "Session 9"): 32 x 64 took 1-20% less than the 64 x 32 used before in all four
    cases, and was the fastest in two of them. For a few draft rows a request, 16 x 64 (in CUDA
    graphs, "Session 10": 0.69 ms against 1.02 ms for 16 x 32 at 3 requests of 16 drafts)."""
    knob = _tiles_knob()
    if knob is not None:
        return knob[0], knob[1]
    return (16, 64) if max_draft <= 16 else (32, 64)


def draft_warps() -> int:
    """Warps a program runs (``VLLM_ODB_DRAFT_TILES``' third value; 4 by default)."""
    knob = _tiles_knob()
    return 4 if knob is None else knob[2]


def draft_stages() -> int | None:
    """Software-pipelining stages of the kernel's key loop (``VLLM_ODB_DRAFT_TILES``' fourth value;
    None: Triton's default). For the GPU sweep (scripts/gpu_draft_tiles.py): at batch 1 the kernel
    runs far from its memory bound (session 10: ~68 us a layer for ~21 MB of keys and values)."""
    knob = _tiles_knob()
    return None if knob is None else knob[3]


# Programs to aim for per SM when the keys are split: the SMs take several programs each, and a key
# split adds a partial of every row (written, then merged) for each program it adds.
_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 8


@functools.lru_cache(maxsize=None)
def _sms(device: torch.device) -> int:
    """SMs of a CUDA device (16 elsewhere: Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 16


def draft_splits(programs: int, device) -> int:
    """Key splits of the kernel's launch: the cache's keys of each row tile are cut into this many
    ranges, each its own program, plus one program for the draft keys, and ``_merge_kernel`` joins
    their partials (flash-decoding). A step of few requests has a few dozen row tiles x heads, each
    streaming every key of its request in sequence: splits fill the GPU. A power of two up to
    ``_MAX_SPLITS``; one (no split) once ``programs`` (row tiles x heads) reach ``_PROGRAMS_PER_SM``
    per SM. ``VLLM_ODB_DRAFT_SPLITS=s`` sets it (1 to 16)."""
    override = os.environ.get(SPLITS_ENV, "").strip()
    if override:
        if not override.isdigit() or not 1 <= int(override) <= 16:
            raise ValueError(f"{SPLITS_ENV}={override!r}: give a whole number of 1 to 16")
        return int(override)
    want = max(1, min(_MAX_SPLITS, -(-_PROGRAMS_PER_SM * _sms(torch.device(device)) // max(1, programs))))
    return 1 << (want.bit_length() - 1)  # a power of two: few compiled variants


def draft_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         out: torch.Tensor, d: DraftRows, scale: float, kernel_block_size: int) -> None:
    """Write the draft rows' attention into ``out`` [T, H * dim] (one launch, two with key splits).
    ``query`` [T, H, dim], ``key``/``value`` [T, Hk, dim]: this step's rows; ``kv_cache`` [blocks, Hk,
    N, 2 * dim] (any strides: keys in the first ``dim`` channels, values in the next). ``d``: a step's
    layout (its exact row tiles) or ``DraftBuffers.rows`` (a FULL graph's launch: as many tiles as a
    step of ``T`` rows can need)."""
    tokens, heads, dim = query.shape
    kv_heads = key.shape[1]
    if kv_cache.stride(3) != 1 or query.stride(2) != 1 or key.stride(2) != 1 or value.stride(2) != 1 \
            or out.stride(1) != 1:
        raise ValueError("draft_rows_attention: the head dimension must be contiguous")
    if d.tiles is None or d.block_m <= 0:
        raise ValueError("draft_rows_attention: the layout has no row tiles (build it with BranchBatch.build(..., "
                         "kernel=True) or DraftBuffers)")
    block_m, block_n = d.block_m, draft_tiles(d.max_draft)[1]
    tiles = d.tiles.shape[0]
    if d.graph_window:
        tiles = min(tiles, tiles_bound(tokens, d.graph_window, block_m))
    if tiles == 0:
        return
    splits = draft_splits(tiles * heads, query.device)
    head_d = max(16, triton.next_power_of_2(dim))
    if splits > 1:  # partials of every tile's rows: (max, sum) and the unnormalised output, in fp32
        part = torch.empty((tiles * block_m * heads * (splits + 1), head_d), dtype=torch.float32, device=query.device)
        ml = torch.empty((part.shape[0], 2), dtype=torch.float32, device=query.device)
    else:
        part = ml = out
    _draft_rows_kernel[(tiles, heads, splits + (splits > 1))](
        query, key, value, kv_cache, out, part, ml,
        d.tiles, d.block_tables, d.rows, d.n_draft, d.ends, d.q0, d.window, d.mask_w, d.mask_d,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), out.stride(0),
        d.block_tables.stride(0), d.rows.stride(0), d.mask_w.stride(0), d.mask_w.stride(1),
        d.mask_d.stride(0), d.mask_d.stride(1),
        scale, kernel_block_size, heads // kv_heads, dim, heads,
        IEEE=query.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=head_d, SPLITS=splits,
        num_warps=draft_warps(), **({} if draft_stages() is None else {"num_stages": draft_stages()}),
    )
    if splits > 1:
        _merge_kernel[(tiles, heads)](out, part, ml, d.tiles, d.rows, d.n_draft, out.stride(0), d.rows.stride(0),
                                      dim, heads, BLOCK_M=block_m, HEAD_D=head_d, SPLITS=splits)
