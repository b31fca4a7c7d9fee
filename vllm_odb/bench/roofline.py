"""Roofline time of a speed row's work: the forwards its requests made, each at
max(FLOPs / bf16 peak, bytes / copy bandwidth) with the ceilings measured in the same run.

A request's forwards follow from its trace (bench/replay.py: commits per forward of each block, the
live canvas after each refresh) and the engine's decoding loop:

- **vllm**: the step that completes the prompt's prefill (``prompt`` rows in the runner's forward)
  also runs the first block's refresh, a side forward over prompt + canvas. Each later forward of a
  block is a runner forward of the step's canvas (the block, + Dream's shift; a jump-share engine's
  canvas follows the batch: ``knobs.step_width`` of the previous step's requests, the whole draft
  canvas alone) against prompt + live canvas; a block its refresh already completed
  takes one (idle) runner forward to go out. The step that completes a block also refreshes the
  next one (prompt + the canvas left, before ALP cuts it). Requests run together up to
  ``max_num_seqs`` (``bench speed`` and ``report`` pass none: the whole batch at once, the
  hardware's bound rather than a jump-share engine's concurrency cap); a finished request's place
  goes to the next one (continuous batching), and all runner rows of a step are one forward, all
  its refreshes another.
- **reference**: each block starts with a refresh (a full forward over prompt + canvas); its later
  forwards are cached steps (dual cache: the block's rows, + Dream's shift; prefix cache: the block
  and the suffix; jump-share: ``canvas_width`` rows, the most a layout takes) or, with no cache,
  full forwards. A batch runs block by block in lockstep: a step is one forward of the requests
  still decoding the block.

Costs per forward are bench/costs.py's (linear layers per row, attention per row and key, weights
streamed once per forward plus the keys' K/V). Query rows a step pads are not counted: the
roofline is of the work the requests needed (a jump-share step counts its scheduled canvas,
``step_width`` rows a request: the rows its drafts may take, padding where they take fewer).
"""

from __future__ import annotations

from collections import deque

from vllm_odb.bench.costs import forward_flops, kv_bytes, weight_bytes

RUN, REFRESH = "run", "refresh"  # the runner's forward of a step, and its refresh side forward


def forward_seconds(flops: float, nbytes: float, peak_tflops: float, bandwidth_gbs: float) -> float:
    """A forward's roofline time: compute-bound or memory-bound, whichever is longer."""
    return max(flops / (peak_tflops * 1e12), nbytes / (bandwidth_gbs * 1e9))


def _vllm_steps(prompt: int, commits, lengths, gen: int) -> list[list[tuple]]:
    """One request's engine steps, each a list of (kind, query rows, keys); a decode forward's rows
    are None: the step's canvas, which the batch sets (``_continuous``)."""
    steps = [[(RUN, prompt, prompt), (REFRESH, prompt + gen, prompt + gen)]]
    for b, counts in enumerate(commits):
        keys = prompt + lengths[b]
        n = max(1, len(counts) - 1)  # forwards after the refresh (one idle if the refresh completed it)
        for i in range(n):
            step = [(RUN, None, keys)]
            if i == n - 1 and b + 1 < len(commits):
                step.append((REFRESH, keys, keys))
            steps.append(step)
    return steps


def _reference_blocks(prompt: int, commits, lengths, gen: int, cfg, shift: int, width: int) -> list[list[tuple]]:
    """One request's forwards block by block, each (kind, query rows, keys)."""
    blocks = []
    for b, counts in enumerate(commits):
        before, keys = prompt + (lengths[b - 1] if b else gen), prompt + lengths[b]
        if cfg.cache == "none":
            blocks.append([(RUN, keys, keys)] * len(counts))
            continue
        if cfg.jump:
            rows = width
        elif cfg.cache == "dual":
            rows = cfg.block_length + shift
        else:  # prefix cache: the block and the suffix
            rows = lengths[b] - b * cfg.block_length + shift
        blocks.append([(REFRESH, before, before)] + [(RUN, rows, keys)] * (len(counts) - 1))
    return blocks


def _lockstep(per_request: list[list[list[tuple]]]) -> list[list[tuple]]:
    """Reference batches: block b of every request, forward k of each still decoding it."""
    steps = []
    for b in range(max(len(r) for r in per_request)):
        block = [r[b] for r in per_request if b < len(r)]
        steps += [[f[k] for f in block if k < len(f)] for k in range(max(map(len, block)))]
    return steps


def _continuous(per_request: list[list[list[tuple]]], cap: int, width_of=lambda batch: 0) -> list[list[tuple]]:
    """vLLM batches: up to ``cap`` requests at once, a waiting one takes a finished one's place; a
    decode forward's rows are ``width_of(requests in the previous step)`` (its canvas)."""
    waiting, running, steps, before = deque(deque(r) for r in per_request), [], [], 1
    while waiting or running:
        while waiting and len(running) < cap:
            running.append(waiting.popleft())
        rows = width_of(before)
        steps.append([(k, rows if n is None else n, keys) for r in running for k, n, keys in r.popleft()])
        before = len(running)
        running = [r for r in running if r]
    return steps


def step_seconds(step: list[tuple], spec, peak_tflops: float, bandwidth_gbs: float) -> float:
    """One engine step: its runner forward and its refresh forward, each at its roofline."""
    total = 0.0
    for kind in (RUN, REFRESH):
        pieces = [(rows, keys) for k, rows, keys in step if k == kind]
        if pieces:
            flops = sum(forward_flops(spec, rows, keys) for rows, keys in pieces)
            nbytes = weight_bytes(spec) + kv_bytes(spec, sum(keys for _, keys in pieces))
            total += forward_seconds(flops, nbytes, peak_tflops, bandwidth_gbs)
    return total


def row_seconds(traces: list[dict], spec, cfg, engine: str, batch: int, peak_tflops: float, bandwidth_gbs: float,
                max_num_seqs: int | None = None) -> tuple[float, int]:
    """Roofline seconds of a row's requests (``traces``: ``{prompt_len, replay}`` each, in run order;
    batch 1 runs them one after another, a larger batch together) and its forward count."""
    from vllm_odb.engine.knobs import canvas_width, step_width

    width = canvas_width(cfg, spec.logits_shift)
    groups = [[t] for t in traces] if batch == 1 else [traces]
    total, forwards = 0.0, 0
    for group in groups:
        if engine == "vllm":
            steps = _continuous([_vllm_steps(t["prompt_len"], t["replay"]["commits"], t["replay"]["lengths"],
                                             cfg.gen_length) for t in group], max_num_seqs or batch,
                                lambda b: step_width(cfg, spec.logits_shift, b))
        else:
            steps = _lockstep([_reference_blocks(t["prompt_len"], t["replay"]["commits"], t["replay"]["lengths"],
                                                 cfg.gen_length, cfg, spec.logits_shift, width) for t in group])
        total += sum(step_seconds(s, spec, peak_tflops, bandwidth_gbs) for s in steps)
        forwards += sum(len({kind for kind, _, _ in s}) for s in steps)
    return total, forwards
