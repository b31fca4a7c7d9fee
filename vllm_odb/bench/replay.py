"""Trace replay: a request's recorded decoding dynamics, forced onto another model.

Random-weight full-size models are never confident: every method degenerates to one token per
step and ALP never fires. To time real dynamics at real size, the benchmarks record what a method
does on a tiny trained checkpoint (tokens committed by each forward of each block, the canvas
length each refresh leaves, the block decoding ends after) and replay it: the engine runs its own
code path (refreshes, cached steps, jump-share layouts, ALP's predictions over the canvas) on the
big model, but the commit counts, the canvas cuts and the end come from the trace. A forward's
shape depends only on those (masked positions per block, live canvas, live batch), so the replayed
run makes the recorded forwards.

Both engines take a ``Replay`` per request as their ``Forcing`` (policies/forcing.py: the three
decisions it overrides). The reference loop records with a ``Recorder`` as its step observer
(``generate_traced`` wraps both); the vLLM engine gets a trace per request as
``SamplingParams.extra_args["replay"]``, and imports this module only when a request carries one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Replay:
    """One request's recorded trace, its ``Forcing``. ``commits[b][k]``: tokens the k-th forward
    of block ``b`` committed (drafted tokens a jump-share step adopted included); ``lengths[b]``:
    the live canvas after block ``b``'s refresh. Decoding ends after the last recorded block."""

    commits: tuple[tuple[int, ...], ...]
    lengths: tuple[int, ...]

    def __post_init__(self):
        if not self.commits or len(self.lengths) != len(self.commits):
            raise ValueError("replay: commits and lengths need one entry per decoded block")
        for b, steps in enumerate(self.commits):
            if not steps or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in steps):
                raise ValueError(f"replay: commits[{b}] must be a non-empty list of integers >= 1")

    @property
    def blocks(self) -> int:
        return len(self.commits)

    def count(self, block: int, step: int) -> int:
        """Tokens to commit at this forward (1 past the recorded steps: the block must finish)."""
        steps = self.commits[block] if block < self.blocks else ()
        return steps[step] if step < len(steps) else 1

    def length(self, block: int, current: int) -> int:
        return self.lengths[block] if block < self.blocks else current

    def last(self, block: int) -> bool:
        """Decoding ends after this block."""
        return block >= self.blocks - 1

    def to_dict(self) -> dict:
        return {"commits": [list(c) for c in self.commits], "lengths": list(self.lengths)}

    @classmethod
    def from_dict(cls, d) -> "Replay":
        if not isinstance(d, dict) or set(d) != {"commits", "lengths"}:
            raise ValueError("replay must be an object with keys 'commits' and 'lengths'")
        try:
            return cls(tuple(tuple(c) for c in d["commits"]), tuple(int(n) for n in d["lengths"]))
        except TypeError:
            raise ValueError("replay: commits is a list of lists of integers, lengths a list of integers") from None


class Recorder:
    """The reference loop's step observer that builds each request's ``Replay``: ``block`` at a
    block's start, ``set_lengths`` after its refresh (the live canvas lengths) and ``step`` after
    every forward."""

    def __init__(self, batch: int):
        self.commits: list[list[list[int]]] = [[] for _ in range(batch)]
        self.lengths: list[list[int]] = [[] for _ in range(batch)]

    def block(self, live: torch.Tensor, lengths: torch.Tensor) -> None:
        for i, (on, n) in enumerate(zip(live.tolist(), lengths.tolist())):
            if on:
                self.commits[i].append([])
                self.lengths[i].append(int(n))

    def set_lengths(self, live: torch.Tensor, lengths: torch.Tensor) -> None:
        for i, (on, n) in enumerate(zip(live.tolist(), lengths.tolist())):
            if on:
                self.lengths[i][-1] = int(n)

    def step(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """``before`` / ``after``: the block's masked positions around one forward."""
        for i, n in enumerate((before & ~after).sum(1).tolist()):
            if before[i].any():
                self.commits[i][-1].append(int(n))

    def traces(self) -> list[dict]:
        return [Replay(tuple(map(tuple, c)), tuple(n)).to_dict() if c else None
                for c, n in zip(self.commits, self.lengths)]


def generate_traced(model, prompts: list[list[int]], cfg, special, replay: list[Replay] | None = None,
                    record: bool = False, **kwargs):
    """The reference loop (``vllm_odb.reference.generate.generate``) with trace replay and recording:
    ``replay``, one trace per prompt, forced onto this model; with ``record``, ``stats["trace"]``
    holds each request's trace as a dict (None for a request that decoded nothing)."""
    from vllm_odb.reference.generate import generate

    recorder = Recorder(len(prompts)) if record else None
    out = generate(model, prompts, cfg, special, forcing=replay, observer=recorder, **kwargs)
    if recorder is not None:
        out.stats["trace"] = recorder.traces()
    return out
