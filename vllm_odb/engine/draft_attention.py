"""Jump-share's draft rows in one kernel a layer: attention of each planned request's draft rows
over its keys in vLLM's paged cache and the draft rows' own keys of this step, under the branch
layout's mask (engine/model_state.py ``BranchAttention`` says which keys a draft row reads).

One Triton program takes ``BLOCK_M`` draft rows of one request and one head. It streams the
request's keys ``[0, end)`` from the paged cache through its block table, then the draft rows'
own keys from this step's key/value rows, with an online softmax in fp32; nothing is gathered or
materialised on the side (``BranchBatch``'s SDPA route copies every key of the sequence per layer).
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

import os
from dataclasses import dataclass

import torch

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


class DraftBuffers:
    """The kernel's inputs at fixed addresses and sizes, for jump-share steps captured in FULL CUDA
    graphs (``VLLM_ODB_JUMP_GRAPHS=full``; engine/knobs.py): room for ``capacity`` planned requests
    of at most ``max_draft`` draft rows, windows of at most ``window`` rows, block tables ``blocks``
    wide. A step's layout (``DraftRows``) is copied in; every request slot past it gets zero draft
    rows, so the launch captured over the whole capacity (``draft_rows_attention``'s grid follows
    ``rows``' shape) skips them at once. Stale rows, masks and tables past a slot's draft count are
    never read: the kernel reads draft row ``m`` and draft key ``j`` below that count only, and the
    window mask inside that slot's own window."""

    def __init__(self, capacity: int, max_draft: int, window: int, blocks: int, device):
        i32 = {"dtype": torch.int32, "device": device}
        self.rows = DraftRows(
            block_tables=torch.zeros((capacity, blocks), **i32),
            rows=torch.zeros((capacity, max_draft), dtype=torch.long, device=device),
            n_draft=torch.zeros(capacity, **i32), ends=torch.zeros(capacity, **i32),
            q0=torch.zeros(capacity, **i32), window=torch.zeros(capacity, **i32),
            mask_w=torch.zeros((capacity, max_draft, window), dtype=torch.int8, device=device),
            mask_d=torch.zeros((capacity, max_draft, max_draft), dtype=torch.int8, device=device),
            max_draft=max_draft)

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

    # Triton specialises integer arguments (equal to 1, divisible by 16) and compiles once per
    # combination: the strides below follow the step's plans (draft rows per request), which change
    # with the batch (knobs.step_width), so each new combination would stall a step for a compile.
    @triton.jit(do_not_specialize=["s_rows", "s_mw_r", "s_mw_m", "s_md_r", "s_md_m"])
    def _draft_rows_kernel(
        q_ptr, k_ptr, v_ptr, cache_ptr, out_ptr,
        bt_ptr, rows_ptr, nd_ptr, end_ptr, q0_ptr, win_ptr, mw_ptr, md_ptr,
        sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_b, sc_h, sc_n, so_t,
        s_bt, s_rows, s_mw_r, s_mw_m, s_md_r, s_md_m,
        scale, kbs, group, dim,
        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
    ):
        r = tl.program_id(0)
        h = tl.program_id(1)
        nd = tl.load(nd_ptr + r)
        if tl.program_id(2) * BLOCK_M < nd:
            m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = m < nd
            c = tl.arange(0, HEAD_D)
            c_ok = c < dim
            row = tl.load(rows_ptr + r * s_rows + m, mask=m_ok, other=0)
            q = tl.load(q_ptr + row[:, None] * sq_t + h * sq_h + c[None], mask=m_ok[:, None] & c_ok[None], other=0.0)
            kh = h // group
            end = tl.load(end_ptr + r)
            q0 = tl.load(q0_ptr + r)
            win = tl.load(win_ptr + r)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, HEAD_D), tl.float32)
            # The request's keys in the paged cache: all of [0, end) but the window, where mask_w says.
            for start in range(0, end, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                n_ok = n < end
                blk = tl.load(bt_ptr + r * s_bt + n // kbs, mask=n_ok, other=0).to(tl.int64)
                at = cache_ptr + blk[:, None] * sc_b + kh * sc_h + (n % kbs)[:, None] * sc_n + c[None]
                k = tl.load(at, mask=n_ok[:, None] & c_ok[None], other=0.0)
                v = tl.load(at + dim, mask=n_ok[:, None] & c_ok[None], other=0.0)
                in_w = (n >= q0) & (n < q0 + win)
                out_w = (n < q0) | (n >= q0 + win)
                mw = tl.load(mw_ptr + r * s_mw_r + m[:, None] * s_mw_m + (n - q0)[None],
                             mask=m_ok[:, None] & in_w[None] & n_ok[None], other=0)
                seen = n_ok[None] & (out_w[None] | (mw != 0))
                m_i, l_i, acc = _attend(q, k, v, seen, m_i, l_i, acc, scale, IEEE)
            # The draft rows' own keys of this step, where mask_d says.
            for start in range(0, nd, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                j_ok = j < nd
                krow = tl.load(rows_ptr + r * s_rows + j, mask=j_ok, other=0)
                kv_ok = j_ok[:, None] & c_ok[None]
                k = tl.load(k_ptr + krow[:, None] * sk_t + kh * sk_h + c[None], mask=kv_ok, other=0.0)
                v = tl.load(v_ptr + krow[:, None] * sv_t + kh * sv_h + c[None], mask=kv_ok, other=0.0)
                md = tl.load(md_ptr + r * s_md_r + m[:, None] * s_md_m + j[None], mask=m_ok[:, None] & j_ok[None],
                             other=0)
                m_i, l_i, acc = _attend(q, k, v, md != 0, m_i, l_i, acc, scale, IEEE)
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(out_ptr + row[:, None] * so_t + h * dim + c[None], o.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & c_ok[None])


TILES_ENV = "VLLM_ODB_DRAFT_TILES"


def draft_tiles(max_draft: int) -> tuple[int, int]:
    """The kernel's (BLOCK_M, BLOCK_N): draft rows and keys a program takes at a time. Each program
    streams all of its request's keys, so wider row tiles read them fewer times but leave fewer
    programs to fill the GPU (at batch 1: heads x row tiles). ``VLLM_ODB_DRAFT_TILES=m,n`` overrides
    them (benchmarks: scripts/gpu_draft_tiles.py). Measured on the H200 at LLaDA-8B shapes (BENCHMARKS.md,
    "Session 9"): 32 x 64 took 1-20% less than the 64 x 32 used before in all four cases, and was the
    fastest in two of them."""
    override = os.environ.get(TILES_ENV, "").strip()
    if override:
        try:
            m, n = (int(x) for x in override.split(","))
        except ValueError:
            m = n = 0
        if m not in (16, 32, 64, 128) or n not in (16, 32, 64, 128):
            raise ValueError(f"{TILES_ENV}={override!r}: give 'm,n', each of 16, 32, 64 or 128")
        return m, n
    return (16, 32) if max_draft <= 16 else (32, 64)


def draft_rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         out: torch.Tensor, d: DraftRows, scale: float, kernel_block_size: int) -> None:
    """Write the draft rows' attention into ``out`` [T, H * dim] (one launch). ``query`` [T, H, dim],
    ``key``/``value`` [T, Hk, dim]: this step's rows; ``kv_cache`` [blocks, Hk, N, 2 * dim] (any
    strides: keys in the first ``dim`` channels, values in the next)."""
    _, heads, dim = query.shape
    kv_heads = key.shape[1]
    if kv_cache.stride(3) != 1 or query.stride(2) != 1 or key.stride(2) != 1 or value.stride(2) != 1 \
            or out.stride(1) != 1:
        raise ValueError("draft_rows_attention: the head dimension must be contiguous")
    block_m, block_n = draft_tiles(d.max_draft)
    grid = (d.rows.shape[0], heads, triton.cdiv(max(d.max_draft, 1), block_m))
    _draft_rows_kernel[grid](
        query, key, value, kv_cache, out,
        d.block_tables, d.rows, d.n_draft, d.ends, d.q0, d.window, d.mask_w, d.mask_d,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), out.stride(0),
        d.block_tables.stride(0), d.rows.stride(0), d.mask_w.stride(0), d.mask_w.stride(1),
        d.mask_d.stride(0), d.mask_d.stride(1),
        scale, kernel_block_size, heads // kv_heads, dim,
        IEEE=query.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_D=max(16, triton.next_power_of_2(dim)),
    )
