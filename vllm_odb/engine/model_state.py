"""``ODBModelState``: LLaDA/Dream's hook into vLLM 0.26's V2 model runner (DiffusionGemma's route).

What vLLM's diffusion path gives us: each running request is scheduled as ``width`` draft slots
(``diffusion_config.canvas_length``) after its committed tokens, with no AR bonus token, and the
sampler may commit 0..width of them per step. What this state adds:

- bidirectional attention: ``causal=False`` in the attention metadata of every step;
- the dual cache: a decode step's keys are the whole sequence, prompt + canvas, so the sequence
  length handed to attention is prompt + live canvas, not vLLM's ``num_computed + query``
  (the suffix's slots exist thanks to patches/scheduler_lookahead.py and hold the KV the last
  refresh wrote). With Streaming-dLLM's suffix pruning the keys are the pruned canvas instead:
  the block, its window and the final position, which the refresh put in the slot after the
  window (engine/requests.py ``ODBRequest.kept``);
- Dream's shifted logits: Dream predicts token i from position i-1, so its query window is the
  position before the block plus the block (width = block + 1). vLLM schedules the window at
  ``[s, s + width)``; positions and KV slots are moved one back here, so the window is
  ``[s - 1, s + block)``, the same rows the reference loop queries;
- the request table (per-request knobs and canvases) and the sampler that decodes
  (``custom_sampler``).

All per-step writes go to persistent buffers (the runner's positions and slot mappings, our
``seq_lens``), so FULL CUDA-graph replays of decode steps see them. No worker subclass is needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.config.compilation import CUDAGraphMode
from vllm.v1.worker.gpu.attn_utils import build_attn_metadata
from vllm.v1.worker.gpu.buffer_utils import async_copy_to_gpu
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from vllm_odb.checkpoint import special_tokens
from vllm_odb.engine import CHECK, check, kv_release
from vllm_odb.engine.metrics import RequestCounters
from vllm_odb.engine.refresh import kv_slots
from vllm_odb.engine.requests import RequestTable, decode_rows
from vllm_odb.policies import DecodeConfig


class ODBModelState(DefaultModelState):
    num_new_sampled_tokens_per_step = 0  # diffusion: no AR bonus token

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
                                  RequestCounters(enabled=_is_first_rank()))
        self.width = self.table.width
        # Jump-share engines: every attention layer's impl gets the draft-row side path.
        self.branch_attention = []
        if engine.jump:
            from vllm_odb.engine.branches import BranchAttention

            for layer in model.model.layers:
                impl = layer.self_attn.attn.impl
                wrapper = BranchAttention(impl.forward, lambda: self.kernel_block_size)
                impl.forward = wrapper
                self.branch_attention.append(wrapper)
            self._base_offsets = torch.arange(self.width, device=device)
        if vllm_config.num_speculative_tokens != self.width:
            raise RuntimeError(f"vLLM schedules {vllm_config.num_speculative_tokens} canvas slots per "
                               f"request, the decoder needs {self.width} (engine/knobs.py canvas_width)")
        self.seq_lens_buf = torch.zeros(self.max_num_reqs, dtype=torch.int32, device=device)
        self.seq_len_override = np.zeros(self.max_num_reqs, dtype=np.int32)
        # The step's gathered block tables (batch-row order) and the KV kernel block size, for the
        # refresh forward's slots and Dream's moved window.
        self.block_tables: torch.Tensor | None = None
        self.kernel_block_size: int | None = None
        # The runner's own per-request block lists (vLLM's BlockTables), handed over by
        # patches/runner_block_tables.py: ALP cuts trim them as the scheduler frees blocks.
        self.runner_block_tables = None

    def attach_block_tables(self, block_tables) -> None:
        self.runner_block_tables = block_tables

    def trim_blocks(self, slot: int, num_tokens: int) -> None:
        """The scheduler frees ``slot``'s blocks past ``num_tokens`` (engine/kv_release.py): the
        runner's copy of its block list drops them too, so blocks allocated later land where the
        scheduler has them. Takes effect at the runner's next ``apply_staged_writes``."""
        bt = self.runner_block_tables
        if bt is None:
            raise RuntimeError("vllm-odb: the runner's block tables were not handed over "
                               "(patches/runner_block_tables.py); an ALP cut cannot free KV blocks safely")
        for g, size in enumerate(bt.block_sizes):
            keep = kv_release.keep_blocks(num_tokens, size) * bt.blocks_per_kv_block[g]
            bt.num_blocks.np[g, slot] = min(int(bt.num_blocks.np[g, slot]), keep)

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        self.table.add(req_index, new_req_data.req_id, new_req_data.prompt_token_ids or [],
                       new_req_data.prefill_token_ids, new_req_data.sampling_params)

    def remove_request(self, req_id: str) -> None:
        self.table.remove(req_id)

    def custom_sampler(self, sampler: Any) -> tuple[Any, Any] | None:
        from vllm_odb.engine.sampler import ODBSampler

        return ODBSampler(self, sampler), None

    # ---- attention ------------------------------------------------------------------------
    def prepare_attn(self, input_batch, cudagraph_mode, block_tables, slot_mappings, attn_groups,
                     kv_cache_config, for_capture: bool = False) -> dict[str, Any]:
        if cudagraph_mode == CUDAGraphMode.FULL:
            num_reqs, num_tokens = input_batch.num_reqs_after_padding, input_batch.num_tokens_after_padding
        else:
            num_reqs, num_tokens = input_batch.num_reqs, input_batch.num_tokens
        self.seq_lens_buf[:num_reqs].copy_(input_batch.seq_lens[:num_reqs])
        for wrapper in self.branch_attention:
            wrapper.rows = []
        if not for_capture:
            self.block_tables = block_tables[0]
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
        rows = decode_rows(input_batch, self.width)
        if len(rows) == 0:
            return
        slots = input_batch.idx_mapping_np[rows]
        # Keys: exactly the slots the block attends (prompt + live canvas, or Streaming's pruned
        # canvas); vLLM's count (num_computed + width) runs past the canvas in Dream's last block.
        override = np.full(input_batch.num_reqs, -1, dtype=np.int32)
        override[rows] = [self._keys(s) for s in slots]
        lens = async_copy_to_gpu(override, device=self.device)
        n = input_batch.num_reqs
        torch.where(lens >= 0, lens, self.seq_lens_buf[:n], out=self.seq_lens_buf[:n])
        if self.shift:
            starts = input_batch.query_start_loc_np[rows]
            tok = (starts[:, None] + np.arange(self.width)[None]).reshape(-1)
            tok_rows = np.repeat(rows, self.width)
            tok_g = async_copy_to_gpu(tok.astype(np.int64), device=self.device)
            rows_g = async_copy_to_gpu(tok_rows.astype(np.int64), device=self.device)
            pos = input_batch.positions[tok_g] - self.shift
            input_batch.positions[tok_g] = pos
            kbs = self.kernel_block_size
            table = self.block_tables[rows_g]
            slot = table.gather(1, (pos // kbs)[:, None])[:, 0].long() * kbs + pos % kbs
            slot_mappings[0, tok_g] = slot.to(slot_mappings.dtype)

    def _branch_rows(self, input_batch, slot_mappings) -> None:
        """Jump-share engines: the dual cache's sequence lengths, and each decode row's positions
        and KV slots. Row i of a request's canvas sits at ``start - shift + offset[i]``: base rows
        at their window offset (written to the cache), planned draft rows at their layout offset
        and padding rows anywhere (neither written: slot -1). Planned requests go to the draft
        rows' attention (engine/branches.py)."""
        from vllm_odb.engine.branches import BranchRows

        rows = decode_rows(input_batch, self.width)
        if len(rows) == 0:
            return
        table, w = self.table, self.table.window
        n = input_batch.num_reqs
        slots_np = input_batch.idx_mapping_np[rows]
        reqs = [table.get(int(s)) for s in slots_np]
        # Keys: exactly the slots the block attends (see _dual_cache_and_shift).
        ends = np.full(n, -1, dtype=np.int32)
        ends[rows] = [-1 if q is None else q.keys for q in reqs]  # unknown rows keep vLLM's count
        ends_g = async_copy_to_gpu(ends, device=self.device)
        torch.where(ends_g >= 0, ends_g, self.seq_lens_buf[:n], out=self.seq_lens_buf[:n])
        offsets, written, branch_rows = [], [], []
        for r, q in zip(rows, reqs):
            plan = None if q is None else q.plan
            used = w if plan is None else plan.num_rows
            off = self._base_offsets.clone()
            off[w:] = 0
            if plan is not None:
                off[:used] = plan.offsets
            offsets.append(off)
            written.append(self._base_offsets < w)
            if plan is not None and q is not None:
                first = int(input_batch.query_start_loc_np[r])
                branch_rows.append(BranchRows(first=first, plan=plan, q0=q.start - self.shift, end=q.keys,
                                              block_table=self.block_tables[r]))
        starts = input_batch.query_start_loc_np[rows]
        tok = async_copy_to_gpu((starts[:, None] + np.arange(self.width)[None]).reshape(-1).astype(np.int64),
                                device=self.device)
        q0 = async_copy_to_gpu(np.array([0 if q is None else q.start - self.shift for q in reqs], dtype=np.int64),
                               device=self.device)
        pos = (q0[:, None] + torch.stack(offsets)).reshape(-1)
        input_batch.positions[tok] = pos.to(input_batch.positions.dtype)
        kbs = self.kernel_block_size
        table_rows = self.block_tables[async_copy_to_gpu(np.repeat(rows, self.width).astype(np.int64),
                                                         device=self.device)]
        slot = table_rows.gather(1, (pos // kbs)[:, None])[:, 0].long() * kbs + pos % kbs
        slot = torch.where(torch.stack(written).reshape(-1), slot, -1)
        slot_mappings[0, tok] = slot.to(slot_mappings.dtype)
        for wrapper in self.branch_attention:
            wrapper.rows = branch_rows

    def _keys(self, slot: int) -> int:
        req = self.table.get(slot)
        return -1 if req is None else req.keys

    def _calibrate(self, input_batch, kv_cache_config, slot_mappings) -> None:
        """Find the block size the block tables count in (the attention kernel's), once, by
        reproducing the runner's slot mapping of this step's first token."""
        if self.kernel_block_size is not None or input_batch.num_reqs == 0:
            return
        block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        first = int(input_batch.query_start_loc_np[0])
        count = int(input_batch.num_scheduled_tokens[0])
        pos = input_batch.positions[first:first + count]
        want = slot_mappings[0, first:first + count].long()
        for kbs in sorted({d for d in range(1, block_size + 1) if block_size % d == 0}, reverse=True):
            if torch.equal(kv_slots(self.block_tables[0], pos, kbs), want):
                self.kernel_block_size = kbs
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
