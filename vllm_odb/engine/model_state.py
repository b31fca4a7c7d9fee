"""``ODBModelState``: LLaDA/Dream's hook into vLLM 0.26's V2 model runner (DiffusionGemma's route),
and everything of a step that touches vLLM's paged KV cache.

What vLLM's diffusion path gives us: each running request is scheduled as ``width`` draft slots
(``diffusion_config.canvas_length``) after its committed tokens, with no AR bonus token, and the
sampler may commit 0..width of them per step. What this file adds, in the order a step uses it:

- the step's inputs (``prepare_attn``): bidirectional attention (``causal=False`` in the attention
  metadata of every step) and the dual cache: a decode step's keys are the whole sequence, prompt
  + canvas, so the sequence length handed to attention is prompt + live canvas, not vLLM's
  ``num_computed + query`` (the suffix's slots exist thanks to patches/scheduler_lookahead.py and
  hold the KV the last refresh wrote). With Streaming-dLLM's suffix pruning the keys are the
  pruned canvas instead: the block, its window and the final position, which the refresh put in
  the slot after the window (engine/requests.py ``ODBRequest.kept``);
- Dream's shifted logits: Dream predicts token i from position i-1, so its query window is the
  position before the block plus the block (width = block + 1). vLLM schedules the window at
  ``[s, s + width)``; positions and KV slots are moved one back here, so the window is
  ``[s - 1, s + block)``, the same rows the reference loop queries;
- jump-share's draft rows (``BranchAttention``): a jump-share engine schedules a wider canvas per
  request (``knobs.canvas_width``: ``ridge_rows``; models/hook.py). The first ``window`` rows are the base branch, the next rows
  the drafts the sampler planned (engine/requests.py ``JumpPlan``), the rest padding. Every row
  gets the position of its window offset; base rows write their KV to the block's slots as in a
  plain step, draft and padding rows write nothing (slot -1). The backend's kernel runs the whole
  batch as usual, which is exact for base rows; ``BranchAttention`` then recomputes the draft rows
  of each planned request with SDPA over [prefix | the window keys its mask allows | suffix]
  gathered from the paged cache plus the drafts' own keys from this step: the reference loop's
  mask (a draft sees its own rows; a shared-layout draft reads the base branch's keys at offsets
  where it has no row). Why this route (reasoned, not yet measured at full size): the base rows
  keep vLLM's paged-attention kernel (and its speed); only the draft rows, a few per request below
  the ridge point, take the SDPA side path, which reads the same paged cache and needs no kernel
  of ours. Its cost is a gather of the request's keys and values per layer (prompt + canvas) and
  one masked SDPA call per planned request. FlexAttention would need a block mask per step over
  paged keys and a compile per shape; a kernel of ours is what would replace the SDPA gather if
  the speed benchmarks say it matters. With the Triton kernel (bf16/fp16) a uniform decode step
  is captured whole in FULL graphs by default (``VLLM_ODB_JUMP_GRAPHS``; one set per step width,
  patches/cudagraph_widths.py), the kernel's inputs in fixed buffers (``DraftBuffers``, filled by
  ``_branch_rows``), and refreshes and mixed steps replay PIECEWISE graphs with the kernel launched
  between them; on the SDPA route (or ``piecewise``) the attention op runs outside CUDA graphs
  (PIECEWISE) and everything else in the layer stays graphed;
- the Fast-dLLM cache refresh (``CacheRefresh``), which the sampler runs at every block start: one
  full forward over prompt + committed tokens + the whole masked canvas rewrites the KV of every
  position (the committed prefix now sees the tokens decoded since, and the masked suffix gets the
  keys the dual cache attends to) and its logits take the block's first decoding step. vLLM has no
  API to rewrite KV below ``num_computed_tokens``. The two candidates were a scheduler rewind
  (``num_computed_tokens`` back to 0 for one step, which re-schedules the whole sequence through
  the scheduler's token budget and needs the scheduler, the GPU-side counters and async
  scheduling's placeholders to agree on a negative step) and a side forward run by the engine
  itself. We run the side forward, from the sampler, right after the step that finished the
  previous block (or the prompt's prefill): its logits give the block's first step, so a block
  costs what it costs the research code, with two known extras: vLLM's own prefill forward over
  the prompt is redone by the first refresh, and a block the refresh step already completes is
  committed by one more (idle) canvas forward, since a step can commit one block only. It needs no
  scheduler change, and leaves vLLM's bookkeeping untouched: the positions it rewrites are ones
  vLLM already considers computed, or the canvas, which the next step's query overwrites anyway.
  What it gives up: the scheduler does not budget refresh tokens (a step with refreshes takes
  longer than its scheduled tokens suggest), and pipeline parallelism is unsupported (the side
  forward runs all layers on one rank). The side forward is ``DiffusionLMModel.refresh_forward``:
  the model's own layers with ``DenseAttend`` in place of paged attention, which writes each
  layer's keys and values into the request's paged-cache slots with the attention backend's own
  cache-update op, then attends each sequence bidirectionally with SDPA: ``VLLM_ODB_REFRESH=dense``.
  The default, ``paged``, runs the compiled forward instead, with the backend's attention over the
  paged cache (``PagedRefresh``);
- the request table (per-request knobs and canvases) and the sampler that decodes
  (``custom_sampler``), handed the table, the refresh and the draft-token buffer.

All per-step writes go to persistent buffers (the runner's positions and slot mappings, our
``seq_lens``), so FULL CUDA-graph replays of decode steps see them. No worker subclass is needed.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.buffer_utils import async_copy_to_gpu
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_odb.checkpoint import special_tokens
from vllm_odb.engine import CHECK, REFRESH_MARK, check, kv_release
from vllm_odb.engine.draft_attention import (DraftBuffers, DraftRows, draft_rows_attention, draft_tiles,
                                             kernel_selected, tile_map)
from vllm_odb.engine.metrics import RequestCounters
from vllm_odb.engine.requests import JumpPlan, RequestTable, decode_rows, fit_plans
from vllm_odb.policies import DecodeConfig
from vllm_odb.policies.host import to_device

log = logging.getLogger(__name__)


def kv_slots(block_table_row: torch.Tensor, positions: torch.Tensor, kernel_block_size: int) -> torch.Tensor:
    """Paged-cache slot of each position, from one request's block table (kernel-block units)."""
    return (block_table_row[positions // kernel_block_size].long() * kernel_block_size
            + positions % kernel_block_size)


@dataclass
class PagedCache:
    """Where positions live in vLLM's paged KV cache, as the decoder's side paths address it."""

    block_tables: torch.Tensor | None = None  # this step's gathered block tables (batch-row order)
    kernel_block_size: int | None = None  # the block size they count in (the kernel's; calibrated once)
    # The runner's own per-request block lists (vLLM's BlockTables), handed over by
    # patches/runner_block_tables.py: ALP cuts trim them as the scheduler frees blocks.
    runner_block_tables: Any = None

    def slots(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """KV slots of ``positions`` of the request in batch row ``row``."""
        return kv_slots(self.block_tables[row], positions, self.kernel_block_size)

    def release(self, req_id: str, slot: int, end: int, reach: int) -> None:
        """ALP cut ``req_id``'s canvas: prompt + canvas is now ``end`` tokens. A scheduler in this
        process frees the KV blocks past ``end + reach`` (engine/kv_release.py); the runner's copy
        of its block list drops them too, so blocks allocated later land where the scheduler has
        them (the trim takes effect at the runner's next ``apply_staged_writes``)."""
        if not kv_release.note(req_id, end):
            return
        bt = self.runner_block_tables
        if bt is None:
            raise RuntimeError("vllm-odb: the runner's block tables were not handed over "
                               "(patches/runner_block_tables.py); an ALP cut cannot free KV blocks safely")
        for g, size in enumerate(bt.block_sizes):
            keep = kv_release.keep_blocks(end + reach, size) * bt.blocks_per_kv_block[g]
            bt.num_blocks.np[g, slot] = min(int(bt.num_blocks.np[g, slot]), keep)


class DenseAttend:
    """``attend`` for ``refresh_forward``: the sequences are concatenated; ``bounds`` [(a, b)]."""

    def __init__(self, bounds: list[tuple[int, int]], slots: torch.Tensor):
        self.bounds = bounds
        self.slots = slots

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> torch.Tensor:
        n = q.shape[0]
        heads, kv_heads, dim = attn.num_heads, attn.num_kv_heads, attn.head_size
        k3, v3 = k.view(n, kv_heads, dim), v.view(n, kv_heads, dim)
        attn.impl.do_kv_cache_update(attn, k3, v3, attn.kv_cache, self.slots)
        q3 = q.view(n, heads, dim)
        out = torch.empty((n, heads * dim), dtype=q.dtype, device=q.device)
        for a, b in self.bounds:
            o = F.scaled_dot_product_attention(
                q3[a:b].transpose(0, 1)[None], k3[a:b].transpose(0, 1)[None], v3[a:b].transpose(0, 1)[None],
                scale=attn.impl.scale, enable_gqa=heads != kv_heads)
            out[a:b] = o[0].transpose(0, 1).reshape(b - a, heads * dim)
        return out


# VLLM_ODB_REFRESH: paged (the default: token parity on the H200 in session 9, and 1.2-1.4x odb-alp's
# throughput with FULL jump graphs) runs the refresh forward on vLLM's own path (``PagedRefresh``);
# dense: the eager layers with SDPA (``DenseAttend``).
REFRESH_ENV = "VLLM_ODB_REFRESH"
REFRESH_ROUTES = ("dense", "paged")


def refresh_route() -> str:
    """The refresh forward's route from ``VLLM_ODB_REFRESH`` (an unknown value names the variable)."""
    route = os.environ.get(REFRESH_ENV, "").strip().lower() or "paged"
    if route not in REFRESH_ROUTES:
        raise ValueError(f"{REFRESH_ENV}={route!r}: give one of {', '.join(REFRESH_ROUTES)}")
    return route


def piecewise_sizes(vllm_config) -> list[int]:
    """Token counts vLLM's model runner captures PIECEWISE CUDA graphs for (its mixed batches:
    ``cudagraph_capture_sizes`` when the mode's mixed-batch graphs are PIECEWISE and compiled,
    not breakable), ascending; [] when it captures none (eager, FULL-only, another PP rank)."""
    cc = getattr(vllm_config, "compilation_config", None)
    mode = None if cc is None else cc.cudagraph_mode
    if mode is None or mode.mixed_mode() != CUDAGraphMode.PIECEWISE or not cc.cudagraph_capture_sizes:
        return []
    if (getattr(vllm_config.model_config, "enforce_eager", False)
            or vllm_config.parallel_config.pipeline_parallel_size > 1):
        return []
    from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled

    if is_breakable_cudagraph_enabled():
        return []
    # The cache write must run between the pieces, from the forward context's slot mapping (the
    # refresh's slots): captured inside a piece (Inductor graph partition, or splitting ops
    # without it), it would write through the runner's slot-mapping buffer, step N's slots.
    if getattr(cc, "use_inductor_graph_partition", False) or \
            "vllm::unified_kv_cache_update" not in (getattr(cc, "splitting_ops", None) or []):
        return []
    return sorted(set(cc.cudagraph_capture_sizes))


def _capture_triggers() -> int:
    from vllm.compilation.counter import compilation_counter

    return compilation_counter.num_gpu_runner_capture_triggers


def _graphs_captured() -> int:
    from vllm.compilation.counter import compilation_counter

    return compilation_counter.num_cudagraph_captured


def _whole(view: torch.Tensor | None) -> torch.Tensor | None:
    """The whole 1-D buffer ``view`` (a prefix of it) was cut from: the runner's input buffers
    (None if ``view`` is not such a prefix)."""
    if view is None or view.dim() != 1 or view.storage_offset() != 0 or not view.is_contiguous():
        return None
    return view.new_empty(0).set_(view.untyped_storage(), 0, (view.untyped_storage().nbytes() // view.element_size(),))


class PagedRefresh:
    """The refresh forward on vLLM's own forward path: the compiled model (its fused norms, rotary
    and activation kernels, instead of the eager layers' native ops) with the engine's attention
    backend over the paged cache, in place of ``DenseAttend``'s per-sequence SDPA. The refresh is a
    batch of whole sequences, each attending to all of itself: query ``[0, n)`` of job j is its
    positions, its keys are the same ``n`` slots (written first by the layer's cache update), and
    the metadata is non-causal, as every step of ours.

    CUDA graphs: the compiled forward's pieces between attention ops replay the PIECEWISE graphs
    vLLM captured for mixed batches (``piecewise_sizes``), padded to the next captured size, as
    vLLM runs a prefill; attention and the cache writes stay eager between them. Launched eagerly,
    a refresh's ~1000 kernels cost the host ~19 ms on an H100, more than the GPU needs for a
    refresh under ~900 tokens (ALP's cut canvases: session 13's profile). A replayed piece reads
    its inputs at the addresses of its capture, the runner's input buffers, so the refresh's ids
    and positions are copied there (the step's own forward has been launched before them, in
    stream order). Refreshes larger than the largest size, and any in an engine whose capture has
    not started (``num_gpu_runner_capture_triggers``), go eager. The hidden states a graphed
    refresh returns live in the graph pool until the next replay: the sampler reads them at once.
    The attention groups, cache config, input buffers and graph sizes come from the model state's
    first ``prepare_attn`` (``bind``); before that (no step has run) the dense route serves."""

    def __init__(self, model, vllm_config, paged: PagedCache, branch_attention: list):
        self.model = model
        self.vllm_config = vllm_config
        self.paged = paged
        self.branch_attention = branch_attention  # jump-share's wrappers: no draft rows in a refresh
        self.attn_groups = None
        self.kv_cache_config = None
        # token counts with PIECEWISE graphs, ascending: read at the first bind (vLLM settles its
        # graph mode and sizes after the model state is built, when the KV cache is made)
        self.graph_sizes: list[int] = []
        self.input_ids = self.positions = None  # the runner's input buffers (whole), from bind
        self._captures = _capture_triggers()  # vLLM's capture count when this engine's runner began
        self._announced = False
        self._sized = False
        self.graphed = False  # the last call replayed graphs

    unsupported = False  # the engine's cache layout is not the one this route runs: the dense route serves

    def bind(self, attn_groups, kv_cache_config, input_batch=None) -> None:
        if self.input_ids is None and input_batch is not None and not self._sized:
            self._sized = True
            self.graph_sizes = piecewise_sizes(self.vllm_config)
        if self.input_ids is None and input_batch is not None and self.graph_sizes:
            self.input_ids, self.positions = _whole(input_batch.input_ids), _whole(input_batch.positions)
            if self.input_ids is None or self.positions is None:
                log.warning("vllm-odb: the runner's input ids/positions are not prefixes of its buffers: "
                            "refreshes run without CUDA graphs")
                self.graph_sizes, self.input_ids, self.positions = [], None, None
        if self.attn_groups is None and not self.unsupported:
            if len(kv_cache_config.kv_cache_groups) != 1:
                if os.environ.get(REFRESH_ENV, "").strip():
                    raise RuntimeError(f"{REFRESH_ENV}=paged runs one KV-cache group; this engine has "
                                       f"{len(kv_cache_config.kv_cache_groups)}")
                log.warning("vllm-odb: %d KV-cache groups: the refresh runs on the dense route",
                            len(kv_cache_config.kv_cache_groups))
                self.unsupported = True
                return
            self.attn_groups, self.kv_cache_config = attn_groups, kv_cache_config

    @property
    def ready(self) -> bool:
        return self.attn_groups is not None and self.paged.block_tables is not None

    def graph_size(self, n: int) -> int | None:
        """The captured PIECEWISE size a refresh of ``n`` tokens replays (the smallest one >= n),
        or None: eager (none that large, no input buffers seen, or vLLM's capture has not started:
        an engine that captures nothing, or a step before ``capture_model``; a replay of a size
        not captured would capture one on the spot)."""
        if self.input_ids is None or not self.graph_sizes or n > self.graph_sizes[-1]:
            return None
        if _capture_triggers() <= self._captures:
            return None
        if not self._announced:
            self._announced = True
            log.info("vllm-odb: refreshes of up to %d tokens replay PIECEWISE CUDA graphs", self.graph_sizes[-1])
        return self.graph_sizes[bisect.bisect_left(self.graph_sizes, n)]

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor,
                 bounds: list[tuple[int, int]], rows: list[int]) -> torch.Tensor:
        from vllm.forward_context import BatchDescriptor, set_forward_context
        from vllm.v1.worker.gpu.attn_utils import build_slot_mappings_by_layer

        device = ids.device
        n = ids.shape[0]
        lens = [b - a for a, b in bounds]
        starts = np.zeros(len(lens) + 1, dtype=np.int32)
        np.cumsum(lens, out=starts[1:])
        qsl_cpu = torch.from_numpy(starts)
        # two allocations, not views of one: a view at an odd offset is a pointer Triton compiles
        # its attention kernel once more for (16-byte alignment)
        qsl = to_device(starts, device, torch.int32)
        seq_lens = to_device(np.asarray(lens, dtype=np.int32), device, torch.int32)
        tables = self.paged.block_tables[to_device(rows, device)]
        slot_mappings = slots.to(torch.int64)[None]
        meta = build_attn_metadata(
            attn_groups=self.attn_groups, num_reqs=len(lens), num_tokens=n,
            query_start_loc_gpu=qsl, query_start_loc_cpu=qsl_cpu, max_query_len=max(lens),
            seq_lens=seq_lens, max_seq_len=max(lens), block_tables=[tables], slot_mappings=slot_mappings,
            kv_cache_config=self.kv_cache_config, causal=False)
        held = [w.batches for w in self.branch_attention]
        for w in self.branch_attention:
            w.batches = []
        padded = self.graph_size(n)
        self.graphed = padded is not None
        mode, size = (CUDAGraphMode.NONE, n) if padded is None else (CUDAGraphMode.PIECEWISE, padded)
        ids, pos = ids.to(torch.int32), pos.to(torch.int64)
        if padded is not None:  # into the buffers the captured pieces read; padding rows: position 0,
            # no cache write (slot -1), their outputs unused
            self.input_ids[:n].copy_(ids)
            self.positions[:n].copy_(pos)
            ids, pos = self.input_ids[:size], self.positions[:size]
            if size > n:
                pos[n:].zero_()
                slot_mappings = torch.cat([slot_mappings, slot_mappings.new_full((1, size - n), -1)], 1)
        captured = _graphs_captured()
        try:
            with set_forward_context(meta, self.vllm_config, num_tokens=size, cudagraph_runtime_mode=mode,
                                     batch_descriptor=BatchDescriptor(
                                         num_tokens=size,
                                         has_lora=getattr(self.vllm_config, "lora_config", None) is not None),
                                     slot_mapping=build_slot_mappings_by_layer(slot_mappings, self.kv_cache_config)):
                hidden = self.model(input_ids=ids, positions=pos)[:n]
            if padded is not None and _graphs_captured() != captured:
                # no graph of this size existed: vLLM captured one on the spot, whose work did not
                # run. Graphs off for good; this refresh again, eagerly (it rewrites the same slots).
                log.error("vllm-odb: a refresh of %d tokens found no captured graph of %d tokens; refreshes "
                          "run eagerly from now on", n, size)
                self.graph_sizes, self.graphed = [], False
                return self(ids[:n], pos[:n], slots, bounds, rows)
            # The hidden states (graphed: the graph pool's memory) hold until the next replay: the
            # caller reads them at once, and nothing after the sampler reads the step's own.
            return hidden
        finally:
            for w, b in zip(self.branch_attention, held):
                w.batches = b


class CacheRefresh:
    """The Fast-dLLM cache refresh on the paged cache (module doc): the side forward over whole
    sequences, the logits of its rows, and the cache tail an ALP cut frees."""

    def __init__(self, model, paged: PagedCache, paged_forward: PagedRefresh | None = None):
        self.model = model  # the vLLM model: refresh_forward and compute_logits
        self.paged = paged
        self.paged_forward = paged_forward  # VLLM_ODB_REFRESH=paged
        self.graphed = False  # the last forward replayed CUDA graphs (metrics: refresh_graph_tokens)

    def forward(self, tokens: torch.Tensor, jobs: list[tuple]) -> tuple[torch.Tensor, list[int]]:
        """Run the refresh forward for ``jobs`` = [(slot, batch_row, length[, final])]: sequence
        ``tokens[slot, :length]`` at positions 0..length-1, KV written through the block table of
        ``batch_row``. ``final`` (Streaming-dLLM's suffix pruning, ``ODBRequest.kept``): one more
        token, ``tokens[slot, final]`` at position id ``final``, whose keys and values go to the
        cache slot of position ``length``. Returns the final hidden states of all jobs,
        concatenated, and each job's first row in them. Row ``offset + p`` is position p
        (p < length); with Dream's shift its logits predict position p + 1."""
        device = tokens.device
        ids, pos, slots, bounds, offsets, rows = [], [], [], [], [], []
        offset = 0
        for slot, row, length, *rest in jobs:
            rows.append(row)
            final = rest[0] if rest else None
            p = torch.arange(length, device=device)
            ids.append(tokens[slot, :length])
            pos.append(p)
            slots.append(self.paged.slots(row, p))
            n = length
            if final is not None:
                ids.append(tokens[slot, final:final + 1])
                pos.append(torch.full((1,), final, device=device))
                slots.append(self.paged.slots(row, torch.full((1,), length, device=device)))
                n += 1
            bounds.append((offset, offset + n))
            offsets.append(offset)
            offset += n
        route = self.paged_forward
        self.graphed = False
        with torch.profiler.record_function(REFRESH_MARK):  # the step profiler's refresh steps (bench)
            if route is not None and route.ready:
                hidden = route(torch.cat(ids), torch.cat(pos), torch.cat(slots), bounds, rows)
                self.graphed = route.graphed
            else:
                hidden = self.model.model.refresh_forward(torch.cat(ids), torch.cat(pos),
                                                          DenseAttend(bounds, torch.cat(slots)))
        return hidden, offsets

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


@dataclass
class BranchRows:
    """A planned request in this step's batch, for ``BranchAttention``."""

    first: int  # first token row of the request in the batch
    plan: JumpPlan
    q0: int  # position of window offset 0
    end: int  # prompt + live canvas


_SDPA_KEYS = 8192  # key positions (requests x the longest) one padded SDPA call of the draft rows gathers


@dataclass
class BranchBatch:
    """The draft rows of one step's planned requests, laid out once for every layer: each layer
    then attends all of them in one padded SDPA call (a handful of launches, whatever the batch)
    instead of rebuilding each request's key slots and mask per layer. ``R`` planned requests,
    ``L`` the longest one's keys (prompt + live canvas), ``D`` its most draft rows."""

    blk: torch.Tensor | None  # [R, L] kernel block of key position l of request r (padding: any valid one)
    off: torch.Tensor | None  # [R, L] offset in that block
    rows: torch.Tensor  # [R, D] batch row of each draft slot (a request with fewer repeats its last)
    mask: torch.Tensor | None  # [R, 1, D, L + D] bool: draft row d may read key l (cache keys, then draft keys)
    src: tuple[torch.Tensor, torch.Tensor]  # ([n], [n]): (r, d) of each draft slot (real or padding)
    dst: torch.Tensor  # [n] its batch row
    bias: torch.Tensor | None = None  # ``mask`` as SDPA's additive mask, made by the step's first layer
    kernel: DraftRows | None = None  # the Triton route's inputs (engine/draft_attention.py), when selected

    def attn_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask in the query's dtype (0 or -inf), made once a step rather than by SDPA in each layer."""
        if self.bias is None or self.bias.dtype != dtype:
            self.bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf"))
        return self.bias

    @classmethod
    def build(cls, rows: list[BranchRows], block_tables: torch.Tensor, kbs: int, device,
              kernel: bool) -> list["BranchBatch"]:
        """The step's draft rows, for every layer: ``rows``, the planned requests, and
        ``block_tables`` [R, blocks] their block-table rows, in the same order. Each plan's rows
        past its window are draft slots (its real draft rows first, then padding: how many are
        real is on the device only, and padding rows attend to the cache alone, their outputs
        unused). ``kernel``: lay them out for the Triton route (the engine asks
        ``draft_attention.kernel_selected`` once, at start-up), else for the SDPA route, in chunks
        whose padded key gather stays under ``_SDPA_KEYS`` key positions (the old per-request loop
        gathered one request at a time; vLLM's memory profile does not see this path)."""
        keep = [i for i, r in enumerate(rows) if r.plan.num_rows > r.plan.window]
        if not keep:
            return []
        if len(keep) < len(rows):
            block_tables = block_tables[to_device(keep, block_tables.device)]
        planned = [rows[i] for i in keep]
        if len({r.plan.window for r in planned}) > 1:
            raise ValueError("BranchBatch: the planned requests' windows differ (an engine has one)")
        if kernel:
            return [cls._laid_out(planned, block_tables, kbs, device, True)]
        chunks, a = [], 0
        while a < len(planned):
            b, longest = a + 1, planned[a].end
            while b < len(planned) and (b + 1 - a) * max(longest, planned[b].end) <= _SDPA_KEYS:
                longest = max(longest, planned[b].end)
                b += 1
            chunks.append(cls._laid_out(planned[a:b], block_tables[a:b], kbs, device, False))
            a = b
        return chunks

    @classmethod
    def _laid_out(cls, planned: list[BranchRows], block_tables: torch.Tensor, kbs: int, device,
                  kernel: bool) -> "BranchBatch":
        """One batch of planned requests (each with draft slots, one window). Host values go over in
        one pinned copy, the plans' masks in one stack: no sync."""
        w = planned[0].plan.window
        slots = np.array([r.plan.num_rows - w for r in planned])  # draft slots: real rows, then padding
        big_d = int(slots.max())
        # L + D a multiple of 8 (padding keys masked out): SDPA's fused kernels take the mask then
        big_l = -(-(max(r.end for r in planned) + big_d) // 8) * 8 - big_d
        firsts = np.array([r.first + w for r in planned])
        d = np.arange(big_d)
        row_idx = firsts[:, None] + np.minimum(d[None], slots[:, None] - 1)
        src_r, src_d = np.nonzero(d[None] < slots[:, None])
        n, k = len(planned) * big_d, len(src_r)
        block_m = draft_tiles(big_d)[0] if kernel else 0
        tiles = tile_map(slots, block_m).reshape(-1) if kernel else np.zeros(0, dtype=np.int64)
        host = to_device(np.concatenate([row_idx.reshape(-1), src_r, src_d, row_idx[src_r, src_d],
                                         [r.end for r in planned], [r.q0 for r in planned], tiles]), device)
        rows_g, src_r, src_d, dst_g, ends, q0, tiles_g = host.split([n, k, k, k, len(planned), len(planned),
                                                                      len(tiles)])
        attn = _stacked_masks(planned, w + big_d)  # [R, w + D, w + D]
        drafts = torch.stack([r.plan.drafts for r in planned]).to(torch.int32)  # [R] real draft rows
        if kernel:  # (the kernel computes the real rows only)
            i32 = {"dtype": torch.int32}
            kernel_rows = DraftRows(block_tables, rows_g.view(len(planned), big_d), drafts, ends.to(**i32),
                                    q0.to(**i32), torch.full_like(drafts, w), attn[:, w:, :w].to(torch.int8),
                                    attn[:, w:, w:].to(torch.int8), big_d, slots=slots,
                                    tiles=tiles_g.view(-1, 2).to(**i32), block_m=block_m)
            return cls(None, None, rows_g.view(len(planned), big_d), None, (src_r, src_d), dst_g, kernel=kernel_rows)
        pos = torch.arange(big_l, device=device)[None]
        inside = pos < ends[:, None]  # [R, L]
        p = torch.where(inside, pos, 0)
        blk = block_tables.long().gather(1, p // kbs)
        # the layout's mask over the window keys (in place of "every cached key") and the draft keys;
        # a padding row reads every cached key, so it never reads none and its output (unused) stays
        # finite: its key and value are among the draft keys the real rows mask, and a NaN there
        # would still reach them through the product with a zero weight
        cache = inside[:, None].expand(-1, big_d, -1).clone()
        window_keys = (q0[:, None] + torch.arange(w, device=device)[None])[:, None].expand(-1, big_d, -1)
        padding = torch.arange(big_d, device=device)[None] >= drafts[:, None]  # [R, D]
        cache.scatter_(2, window_keys, attn[:, w:, :w] | padding[:, :, None])
        mask = torch.cat([cache, attn[:, w:, w:]], 2)
        return cls(blk, p % kbs, rows_g.view(len(planned), big_d), mask[:, None], (src_r, src_d), dst_g)


def _stacked_masks(planned: list[BranchRows], q: int) -> torch.Tensor:
    """[R, q, q] the plans' row masks (``JumpPlan.attn``), each padded to ``q`` rows with rows that
    attend to no new row."""
    masks = [r.plan.attn for r in planned]
    if any(m.shape[0] != q for m in masks):  # plans laid out for different step widths
        masks = [F.pad(m, (0, q - m.shape[0], 0, q - m.shape[0])) for m in masks]
    return torch.stack(masks)


class BranchAttention:
    """Wraps an attention impl's ``forward``: the kernel for every row, then SDPA for the draft
    rows of jump-share plans (module doc). ``batches`` is set by the model state for each step
    (none: the kernel alone)."""

    def __init__(self, forward, paged: PagedCache):
        self.forward = forward
        self.batches: list[BranchBatch] = []
        self.paged = paged

    def __call__(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = self.forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if not self.batches or attn_metadata is None:
            return out
        heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_size
        q_all = query.view(query.shape[0], heads, dim)
        k_all = key.view(key.shape[0], kv_heads, dim)
        v_all = value.view(value.shape[0], kv_heads, dim)
        out_rows = output.view(output.shape[0], heads * dim)
        for b in self.batches:
            if b.kernel is not None:  # one launch: engine/draft_attention.py
                draft_rows_attention(q_all, k_all, v_all, kv_cache, out_rows, b.kernel, layer.impl.scale,
                                     self.paged.kernel_block_size)
            else:
                self._sdpa(b, layer, query.dtype, q_all, k_all, v_all, kv_cache, out_rows)
        return out

    @staticmethod
    def _sdpa(b: BranchBatch, layer, dtype, q_all, k_all, v_all, kv_cache, out_rows) -> None:
        heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_size
        # Keys: the request's whole sequence from the paged cache (keys and values in one gather),
        # then its draft rows' own keys.
        cached = kv_cache.transpose(1, 2)[b.blk, b.off]  # [R, L, Hk, 2d]
        keys = torch.cat([cached[..., :dim], k_all[b.rows]], 1).transpose(1, 2)  # [R, Hk, L + D, d]
        vals = torch.cat([cached[..., dim:], v_all[b.rows]], 1).transpose(1, 2)
        o = F.scaled_dot_product_attention(q_all[b.rows].transpose(1, 2), keys, vals, attn_mask=b.attn_bias(dtype),
                                           scale=layer.impl.scale, enable_gqa=heads != kv_heads)  # [R, H, D, d]
        out_rows[b.dst] = o.transpose(1, 2)[b.src].reshape(-1, heads * dim).to(out_rows.dtype)


class ODBModelState(DefaultModelState):
    num_new_sampled_tokens_per_step = 0  # diffusion: no AR bonus token
    # Jump-share steps captured in FULL CUDA graphs (VLLM_ODB_JUMP_GRAPHS full or full-any): the draft kernel's
    # inputs at fixed addresses (draft_attention.DraftBuffers), made at the first prepare_attn.
    draft_buffers: DraftBuffers | None = None
    jump_full_graphs = False

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        hf = self.model_config.hf_config
        self.spec = hf.spec
        self.shift = self.spec.logits_shift
        engine = DecodeConfig(**hf.odb_engine)
        try:
            gen_cfg = self.model_config.try_get_generation_config() or {}
        except Exception:  # a checkpoint without generation_config.json
            gen_cfg = {}
        self.table = RequestTable(self.max_num_reqs, self.max_model_len, engine, self.shift,
                                  self.spec.mask_token_id, self.spec.eos_token_id,
                                  [(e,) for e in special_tokens(self.spec, None, gen_cfg).end_ids], device,
                                  RequestCounters(enabled=_is_first_rank()), tokenizer=self._tokenizer)
        self.width = self.table.width
        self.paged = PagedCache()
        # Jump-share engines: every attention layer's impl gets the draft-row side path.
        self.branch_attention = []
        self.paged_refresh = (PagedRefresh(model, vllm_config, self.paged, self.branch_attention)
                              if refresh_route() == "paged" else None)
        self.refresh = CacheRefresh(model, self.paged, self.paged_refresh)
        if engine.jump:
            cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
            model_dtype = str(self.model_config.dtype).removeprefix("torch.")
            if cache_dtype not in ("auto", model_dtype):  # the draft rows read the cache as the model's dtype, unscaled
                raise ValueError(f"vllm-odb: --speculative odb (jump-share) needs the KV cache in the model's dtype; "
                                 f"kv_cache_dtype={cache_dtype!r} is not supported with it (leave it 'auto')")
            self.draft_kernel = kernel_selected(device, self.model_config.dtype)
            if vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs():
                if not self.draft_kernel:  # models/hook.py chooses FULL graphs only with the kernel
                    raise RuntimeError("vllm-odb: a jump-share engine captures FULL CUDA graphs only with the "
                                       "Triton draft-row kernel (a bf16/fp16 model); this one takes the SDPA route")
                self.jump_full_graphs = True
            for layer in model.model.layers:
                impl = layer.self_attn.attn.impl
                wrapper = BranchAttention(impl.forward, self.paged)
                impl.forward = wrapper
                self.branch_attention.append(wrapper)
        if vllm_config.num_speculative_tokens != self.width:
            raise RuntimeError(f"vLLM schedules {vllm_config.num_speculative_tokens} canvas slots per "
                               f"request, the decoder needs {self.width} (engine/knobs.py canvas_width)")
        self.seq_lens_buf = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)
        self.seq_len_override = np.zeros(self.max_num_reqs, dtype=np.int32)

    def _tokenizer(self):
        """The model's tokenizer (for the requests' stop strings), or None with ``skip_tokenizer_init``."""
        from vllm.tokenizers import cached_tokenizer_from_config

        return cached_tokenizer_from_config(self.model_config)

    def attach_block_tables(self, block_tables) -> None:
        self.paged.runner_block_tables = block_tables

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self.table.add(req_index, new_req_data.req_id, new_req_data.prompt_token_ids or [],
                       new_req_data.prefill_token_ids, new_req_data.sampling_params)

    def remove_request(self, req_id: str) -> None:
        self.table.remove(req_id)

    def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
        from vllm_odb.engine.sampler import ODBSampler

        return ODBSampler(self.table, self.refresh, sampler, self.max_num_tokens), None

    # ---- attention ------------------------------------------------------------------------
    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                     kv_cache_config, for_capture: bool = False) -> dict[str, Any]:
        if cudagraph_mode == CUDAGraphMode.FULL:
            num_reqs, num_tokens = input_batch.num_reqs_after_padding, input_batch.num_tokens_after_padding
        else:
            num_reqs, num_tokens = input_batch.num_reqs, input_batch.num_tokens
        self.seq_lens_buf[:num_reqs].copy_(input_batch.seq_lens[:num_reqs])
        for wrapper in self.branch_attention:
            wrapper.batches = []
        # The draft kernel in every step, over its fixed buffers (none planned yet); not in the dummy
        # runs before the KV cache exists (vLLM's memory profile: the runner's tables come with it).
        if self.jump_full_graphs and (for_capture or self.paged.runner_block_tables is not None):
            graph_batch = self._graph_batch(block_tables[0])
            self.draft_buffers.clear()
            for wrapper in self.branch_attention:
                wrapper.batches = [graph_batch]
        if not for_capture:
            self.paged.block_tables = block_tables[0]
            if self.paged_refresh is not None:
                self.paged_refresh.bind(attn_groups, kv_cache_config, input_batch)
            if CHECK:
                check.step_inputs(input_batch, self.table)
            self._calibrate(input_batch, kv_cache_config, slot_mappings)
            if self.branch_attention:
                self._branch_rows(input_batch, slot_mappings)
            else:
                self._dual_cache_and_shift(input_batch, slot_mappings)
            if CHECK:
                block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
                check.input_ranges(input_batch, slot_mappings, kv_cache_config.num_blocks * block_size,
                                   self.model_config.get_vocab_size(), self.max_model_len, self.table)
        return build_attn_metadata(
            attn_groups=attn_groups,
            num_reqs=num_reqs,
            num_tokens=num_tokens,
            query_start_loc_gpu=input_batch.query_start_loc[: num_reqs + 1],
            query_start_loc_cpu=torch.from_numpy(input_batch.query_start_loc_np[: num_reqs + 1]),
            max_query_len=int(input_batch.num_scheduled_tokens.max()),
            seq_lens=self.seq_lens_buf[:num_reqs],
            max_seq_len=self.max_model_len,
            block_tables=block_tables,
            slot_mappings=slot_mappings,
            kv_cache_config=kv_cache_config,
            causal=False,
            for_cudagraph_capture=for_capture,
        )

    def _dual_cache_and_shift(self, input_batch, slot_mappings) -> None:
        rows = decode_rows(input_batch, self.table)  # a plain engine's decode rows: width slots each
        if len(rows) == 0:
            return
        self._seq_lens(input_batch, rows, [self.table.get(int(s)) for s in input_batch.idx_mapping_np[rows]])
        if self.shift:
            starts = input_batch.query_start_loc_np[rows]
            tok = (starts[:, None] + np.arange(self.width)[None]).reshape(-1)
            tok_rows = np.repeat(rows, self.width)
            tok_g = async_copy_to_gpu(tok.astype(np.int64), device=self.device)
            rows_g = async_copy_to_gpu(tok_rows.astype(np.int64), device=self.device)
            pos = input_batch.positions[tok_g] - self.shift
            input_batch.positions[tok_g] = pos
            kbs = self.paged.kernel_block_size
            table = self.paged.block_tables[rows_g]
            slot = table.gather(1, (pos // kbs)[:, None])[:, 0].long() * kbs + pos % kbs
            slot_mappings[0, tok_g] = slot.to(slot_mappings.dtype)

    def _branch_rows(self, input_batch, slot_mappings) -> None:
        """Jump-share engines: the dual cache's sequence lengths, and each decode row's positions
        and KV slots. A row's scheduled slots follow the batch (``knobs.step_width``); row i of a
        request's canvas sits at ``start - shift + offset[i]``: base rows at their window offset
        (written to the cache), a plan's other rows (its drafts, then its padding) at their layout
        offset and rows past the plan at the window start (none of them written: slot -1).
        Planned requests go to the draft rows' attention (``BranchAttention``)."""
        fit_plans(input_batch, self.table)
        rows = decode_rows(input_batch, self.table)
        if len(rows) == 0:
            return
        w = self.table.window
        reqs = [self.table.get(int(s)) for s in input_batch.idx_mapping_np[rows]]
        self._seq_lens(input_batch, rows, reqs)
        counts = input_batch.num_scheduled_tokens[rows].astype(np.int64)
        starts = input_batch.query_start_loc_np[rows].astype(np.int64)
        firsts = np.cumsum(counts) - counts  # each row's first token among the step's decode tokens
        local = np.arange(int(counts.sum())) - np.repeat(firsts, counts)  # a token's slot in its row
        q0 = np.array([0 if q is None else q.start - self.shift for q in reqs], dtype=np.int64)
        host = np.stack([np.repeat(starts, counts) + local,  # the token's place in the batch
                         np.repeat(q0, counts) + np.where(local < w, local, 0),  # its position (base layout)
                         np.repeat(rows.astype(np.int64), counts),  # its batch row
                         local < w])  # written to the cache
        tok, pos, tok_rows, written = async_copy_to_gpu(host, device=self.device)
        branch_rows, planned_rows, plan_at, plan_q0, plan_offsets = [], [], [], [], []
        for i, (r, q) in enumerate(zip(rows, reqs)):
            plan = None if q is None else q.plan
            if plan is None:
                continue
            plan_at.append(firsts[i] + np.arange(plan.num_rows))
            plan_q0.append(np.full(plan.num_rows, q0[i]))
            plan_offsets.append(plan.offsets)
            branch_rows.append(BranchRows(first=int(starts[i]), plan=plan, q0=int(q0[i]), end=q.keys))
            planned_rows.append(int(r))
        if plan_at:  # the planned rows' layout offsets, in one write
            at, base = async_copy_to_gpu(np.stack([np.concatenate(plan_at), np.concatenate(plan_q0)]),
                                         device=self.device)
            pos[at] = base + torch.cat(plan_offsets).to(pos.dtype)
        input_batch.positions[tok] = pos.to(input_batch.positions.dtype)
        kbs = self.paged.kernel_block_size
        table_rows = self.paged.block_tables[tok_rows]
        slot = table_rows.gather(1, (pos // kbs)[:, None])[:, 0].long() * kbs + pos % kbs
        slot = torch.where(written.bool(), slot, -1)
        slot_mappings[0, tok] = slot.to(slot_mappings.dtype)
        if branch_rows:
            batches = BranchBatch.build(branch_rows, self.paged.block_tables[to_device(planned_rows, self.device)],
                                        kbs, self.device, self.draft_kernel)
            if self.draft_buffers is not None:  # FULL graphs: the kernel reads the step's layout there
                if batches:
                    self.draft_buffers.fill(batches[0].kernel)
                return
            for wrapper in self.branch_attention:
                wrapper.batches = batches

    def _graph_batch(self, block_tables: torch.Tensor) -> BranchBatch:
        """The one draft-row batch of every step of a FULL-graph jump-share engine: the kernel over
        ``DraftBuffers`` of the most planned requests (``max_num_reqs``), draft rows (canvas - window)
        and blocks (the block tables' width). The kernel's block size is baked into the graphs at
        capture, before any step calibrates it (``_calibrate``): it comes from the runner's block
        tables here, and the first real step checks it."""
        if self.draft_buffers is None:
            bt = self.paged.runner_block_tables
            if bt is None:
                raise RuntimeError("vllm-odb: the runner's block tables were not handed over "
                                   "(patches/runner_block_tables.py); FULL graphs of jump-share steps need them")
            self.paged.kernel_block_size = int(bt.kernel_block_sizes[0])
            w = self.table.window
            self.draft_buffers = DraftBuffers(self.max_num_reqs, self.width - w, w, block_tables.shape[1], self.device)
            rows = self.draft_buffers.rows
            none = torch.zeros(0, dtype=torch.long, device=self.device)
            self._draft_graph_batch = BranchBatch(None, None, rows.rows, None, (none, none), none, kernel=rows)
        return self._draft_graph_batch

    def _seq_lens(self, input_batch, rows: np.ndarray, reqs: list) -> None:
        """Keys of each decode row: exactly the slots its block attends (prompt + live canvas, or
        Streaming's pruned canvas); vLLM's count (num_computed + width) runs past the canvas in
        Dream's last block. Rows of unknown requests keep vLLM's count."""
        n = input_batch.num_reqs
        ends = np.full(n, -1, dtype=np.int32)
        ends[rows] = [-1 if q is None else q.keys for q in reqs]
        ends_g = async_copy_to_gpu(ends, device=self.device)
        torch.where(ends_g >= 0, ends_g, self.seq_lens_buf[:n], out=self.seq_lens_buf[:n])

    _calibrated = False

    def _calibrate(self, input_batch, kv_cache_config, slot_mappings) -> None:
        """Find the block size the block tables count in (the attention kernel's), once, by
        reproducing the runner's slot mapping of this step's first token (a size taken earlier
        from the runner, for FULL graphs of jump-share steps, must be the one found)."""
        if self._calibrated or input_batch.num_reqs == 0:
            return
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        first = int(input_batch.query_start_loc_np[0])
        count = int(input_batch.num_scheduled_tokens[0])
        pos = input_batch.positions[first:first + count]
        want = slot_mappings[0, first:first + count].long()
        for kbs in sorted({d for d in range(1, block_size + 1) if block_size % d == 0}, reverse=True):
            if torch.equal(kv_slots(self.paged.block_tables[0], pos, kbs), want):
                if self.paged.kernel_block_size not in (None, kbs):
                    raise RuntimeError(f"vllm-odb: the runner's kernel block size {self.paged.kernel_block_size} "
                                       f"(captured in the jump-share graphs) is not the cache's ({kbs})")
                self.paged.kernel_block_size = kbs
                self._calibrated = True
                return
        raise RuntimeError("vllm-odb could not reproduce vLLM's KV slot mapping from the block table; "
                           "this vLLM build lays out its paged cache differently than 0.26.0")


def _is_first_rank() -> bool:
    """Metrics are written once per engine: by tensor-parallel rank 0."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # no distributed state (a unit test building the state by hand)
        return True
