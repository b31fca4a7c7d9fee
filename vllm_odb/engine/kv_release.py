"""KV blocks past an ALP cut go back to vLLM's pool.

Adaptive length prediction shrinks a request's canvas in the worker (the sampler); the KV blocks
are owned by the scheduler's KV-cache manager. vLLM 0.26 has no channel from the model runner to
the scheduler for this, so the worker notes each cut here and the scheduler patch
(patches/scheduler_lookahead.py) takes it at the request's next allocation and frees the blocks
past ``end + reach`` (``reach``: how far a decode step's query runs past the block, so no later step
allocates again). The note is process-local: it reaches the scheduler when the worker runs in the
engine-core process (one GPU per engine, vLLM's in-process executor). With tensor parallelism the
workers are other processes; their notes are dropped when the request leaves the batch, and its
blocks are freed when it ends, as without ALP.

The worker keeps its own copy of each request's block list (the runner's ``BlockTables``), which
vLLM only ever appends to: blocks the scheduler allocates after the free (a finished request's
EOS steps run past its cut end) arrive as new ids and land after the worker's count. So when the
worker notes a cut that a scheduler in its process will act on, it trims its count to the same
number of blocks (``keep_blocks``; ``model_state.PagedCache.release``), and both lists stay equal.
Without that, positions past the cut would map to freed blocks that another request may own.

Safe because nothing reads or writes past ``end`` before the free: refreshes cover ``[0, end)``,
decode rows write only the block's window (inside ``end + reach``), draft and padding rows write
nothing (engine/model_state.py).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_cuts: dict[str, int] = {}
_listening = False  # a scheduler in this process takes the notes (patches/scheduler_lookahead.py)


def listen() -> None:
    """Called by the scheduler patch: notes made in this process will be acted on."""
    global _listening
    _listening = True


def note(request_id: str, end: int) -> bool:
    """The worker cut ``request_id``'s canvas: prompt + canvas is now ``end`` tokens. Returns
    whether a scheduler in this process will free the blocks past it (then the worker trims its
    block list the same way)."""
    with _lock:
        _cuts[request_id] = min(end, _cuts.get(request_id, end))
    return _listening


def keep_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks a request keeps after a cut at ``num_tokens`` (scheduler and worker alike)."""
    return -(-num_tokens // block_size)


def take(request_id: str) -> int | None:
    """The scheduler's side: the noted end, once."""
    with _lock:
        return _cuts.pop(request_id, None)


def forget(request_id: str) -> None:
    with _lock:
        _cuts.pop(request_id, None)


def release_tail(kv_cache_manager, request_id: str, num_tokens: int) -> int:
    """Free ``request_id``'s blocks past the first ``num_tokens`` tokens, in every KV-cache group.
    Returns the number of blocks freed. (vLLM 0.26 internals: the coordinator's per-group managers
    keep ``req_to_blocks``; the version check in patches/ guards them.)"""
    freed = 0
    for manager in kv_cache_manager.coordinator.single_type_managers:
        blocks = manager.req_to_blocks.get(request_id)
        if not blocks:
            continue
        keep = keep_blocks(num_tokens, manager.block_size)
        tail = blocks[keep:]
        if not tail:
            continue
        del blocks[keep:]
        if manager.num_cached_block.get(request_id, 0) > keep:
            manager.num_cached_block[request_id] = keep
        manager.block_pool.free_blocks(reversed(tail))
        freed += len(tail)
    return freed
