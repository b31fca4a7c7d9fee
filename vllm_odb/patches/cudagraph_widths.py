"""Patch: FULL CUDA graphs for every decode width of a jump-share engine
(``CudaGraphManager._init_candidates`` in vllm/v1/worker/gpu/cudagraph_utils.py, 0.26.0).

A jump-share engine's canvas follows the batch: after a step of B requests each request gets
``knobs.step_width(B)`` query rows (patches/scheduler_lookahead.py), the whole draft canvas at
batch 1 and the plain window from ``ridge_rows // window`` requests on. Under FULL_AND_PIECEWISE
(the plain engine's mode, and the jump-share default: models/hook.py) vLLM captures its uniform
decode FULL graphs for one query length, ``decode_query_len`` (the canvas), unless a dynamic
speculative config lists several; a diffusion engine is built without a speculative config. So
every step below the widest canvas would run PIECEWISE, attention eager. Until session 14 the
jump-share engine ran vLLM's FULL mode instead (graphs of any batch), which captures no PIECEWISE
graphs, so its refreshes launched eagerly: a 496-token refresh took 18.1 ms, against 13.8 ms
graphed (session 15, H100, LLaDA-8B).

The wrapper gives vLLM's candidate builder the engine's widths through the table dynamic
speculative decoding uses (a stand-in speculative config for the duration of the call, with no
token count of its own, so ``num_speculative_tokens`` stays the canvas). It then keeps only the
decode graphs a step can use, and rebuilds the dispatch table from the graphs it kept. A width
w's graphs serve the batches up to the largest one whose step width is w. A batch that shrank
since its widths were set still finds a graph this way. So the wide canvas gets one graph
(batch 1), and the plain window as many as a plain engine has. For each token count the table
lists, for every width, the smallest kept decode graph that holds it, then the smallest mixed
graph. vLLM's own table lists only the graphs of the next captured token count, so a uniform
batch there could miss the graph of its width. Plain engines, other models and other modes get
vLLM's code unchanged.
"""

from __future__ import annotations

from collections import defaultdict

NAME = "cudagraph_widths"


class WidthTable:
    """A stand-in ``SpeculativeConfig`` for vLLM's candidate builder: the decode widths by batch
    size, in ``num_speculative_tokens_per_batch_size``'s ``(min_batch, max_batch, width)`` form."""

    num_speculative_tokens = None  # vllm_config.num_speculative_tokens stays the diffusion canvas

    def __init__(self, widths: list[int]):
        self.num_speculative_tokens_per_batch_size = [(b, b, w) for b, w in enumerate(widths) if b]

    def uses_dynamic_speculative_decoding(self) -> bool:
        return True


def engine_widths(manager) -> list[int] | None:
    """Index B (1..``max_num_reqs``): the decode width of a batch of B on our jump-share engine
    under a mode with separate FULL decode graphs and async scheduling; None otherwise (vLLM's
    candidates unchanged)."""
    from vllm_odb.patches import is_odb_model
    from vllm_odb.patches.scheduler_lookahead import step_widths

    vc = manager.vllm_config
    mode = manager.cudagraph_mode
    if not mode or not (mode.separate_routine() and mode.decode_mode()):
        return None
    if not vc.scheduler_config.async_scheduling:
        # Without async scheduling every step is the whole canvas (patches/scheduler_lookahead.py
        # caps the batch instead): vLLM's own graphs, of that one width, are the right ones.
        return None
    if getattr(vc, "speculative_config", None) is not None:
        return None
    hf = vc.model_config.hf_config
    if not is_odb_model(hf):
        return None
    return step_widths(hf, manager.max_num_reqs)


def kept_decode_graphs(descs: list, widths: list[int]) -> set:
    """The uniform decode graphs among ``descs`` that a step can use: for each width w and each
    batch b up to the largest batch whose width is w, the smallest graph of width w holding b
    requests (per LoRA case)."""
    largest: dict[int, int] = {}
    for b, w in enumerate(widths):
        if b:
            largest[w] = b
    by_case = defaultdict(list)
    for d in descs:
        by_case[(d.uniform_token_count, d.num_active_loras)].append(d)
    keep = set()
    for (w, _), group in by_case.items():
        group.sort(key=lambda d: d.num_reqs)
        for b in range(1, largest.get(w, 0) + 1):
            d = next((d for d in group if d.num_reqs >= b), None)
            if d is not None:
                keep.add(d)
    return keep


def dispatch_table(decode: list, mixed: list) -> dict:
    """``(num_tokens, num_active_loras)`` -> candidate graphs, in the order vLLM's ``dispatch``
    tries them: for each width, the smallest decode graph of that many tokens or more, then the
    smallest mixed graph."""
    table = {}
    top = max((d.num_tokens for d in decode + mixed), default=0)
    for case in {d.num_active_loras for d in decode + mixed}:
        groups = defaultdict(list)  # a width's decode graphs, then the mixed ones (key None)
        for d in decode:
            if d.num_active_loras == case:
                groups[d.uniform_token_count].append(d)
        mix = [d for d in mixed if d.num_active_loras == case]
        lists = [sorted(g, key=lambda d: d.num_tokens) for g in groups.values()]
        at = [0] * len(lists)
        mix.sort(key=lambda d: d.num_tokens)
        m = 0
        for n in range(top + 1):
            row = []
            for i, g in enumerate(lists):
                while at[i] < len(g) and g[at[i]].num_tokens < n:
                    at[i] += 1
                if at[i] < len(g):
                    row.append(g[at[i]])
            row.sort(key=lambda d: d.num_tokens)
            while m < len(mix) and mix[m].num_tokens < n:
                m += 1
            if m < len(mix):
                row.append(mix[m])
            if row:
                table[(n, case)] = row
    return table


def wrap(original):
    def _init_candidates(self):
        widths = engine_widths(self)
        if widths is None:
            return original(self)
        vc = self.vllm_config
        object.__setattr__(vc, "speculative_config", WidthTable(widths))
        try:
            original(self)
        finally:
            object.__setattr__(vc, "speculative_config", None)
        decode_mode, mixed_mode = self.cudagraph_mode.decode_mode(), self.cudagraph_mode.mixed_mode()
        decode = self._capture_descs.get(decode_mode, [])
        keep = kept_decode_graphs(decode, widths)
        decode = [d for d in decode if d in keep]  # vLLM's order (most tokens first)
        if decode:
            self._capture_descs[decode_mode] = decode
        else:
            self._capture_descs.pop(decode_mode, None)
        mixed = self._capture_descs.get(mixed_mode, []) if mixed_mode else []
        self._candidates = dispatch_table(decode, mixed)

    _init_candidates.__wrapped__ = original
    return _init_candidates


def apply() -> None:
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager

    from vllm_odb.patches import install

    install(CudaGraphManager, "_init_candidates", wrap)
