"""Forcing: a benchmark's override of a request's decisions (None on the serving path).

Random-weight full-size models are never confident, so the speed benchmarks force onto them what
a trained checkpoint did (vllm_odb/bench/replay.py records the traces and implements ``Forcing``).
Both engines take one such object per request (or none) and consult it at exactly three
decisions, through the functions below:

- how many tokens a forward commits (``forced_counts``: the recorded number, placed where this
  model is most confident; ``force_commits``);
- the live canvas a refresh leaves (``forced_lengths``: the recorded ALP cut);
- whether decoding ends after a block (``forced_ends``: where the trace ended).

Everything else (the forwards, the rules' own computations, ALP's canvas predictions) runs as when
serving, so a forced run makes the recorded forwards. Each function returns None when no row is
forced, and the policies then decide alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from vllm_odb.policies.commit import commit_topk
from vllm_odb.policies.host import to_device


class Forcing(Protocol):
    """What a request's decoding is forced to do (``block``: the block's index in the canvas)."""

    def count(self, block: int, step: int) -> int:
        """Tokens the ``step``-th forward of ``block`` commits (>= 1)."""

    def length(self, block: int, current: int) -> int:
        """The live canvas after ``block``'s refresh (``current``: the canvas before it)."""

    def last(self, block: int) -> bool:
        """Decoding ends after ``block``."""


def _forced(forcing: Sequence[Forcing | None]) -> bool:
    return any(f is not None for f in forcing)


def forced_counts(forcing: Sequence[Forcing | None], blocks: Sequence[int], steps: Sequence[int],
                  device) -> torch.Tensor | None:
    """[B] tokens each row's forward must commit (0 where the row is not forced: its rule decides),
    or None when no row is forced. ``blocks``/``steps``: each row's block index and forward in it."""
    if not _forced(forcing):
        return None
    return to_device([0 if f is None else f.count(b, s) for f, b, s in zip(forcing, blocks, steps)], device)


def forced_lengths(forcing: Sequence[Forcing | None], blocks: Sequence[int], current: Sequence[int] | torch.Tensor,
                   device) -> torch.Tensor | None:
    """[B] the live canvas each row's refresh leaves (-1 where the row is not forced: ALP decides),
    or None when no row is forced. ``current``: each row's canvas before the refresh (a tensor is
    read back only when some row is forced)."""
    if not _forced(forcing):
        return None
    if isinstance(current, torch.Tensor):
        current = current.tolist()
    return to_device([-1 if f is None else f.length(b, n) for f, b, n in zip(forcing, blocks, current)], device)


def forced_ends(forcing: Sequence[Forcing | None], blocks: Sequence[int], device) -> torch.Tensor | None:
    """[B] 1 where decoding ends after the row's block, 0 where it goes on, -1 where the row is not
    forced (its end markers decide); None when no row is forced."""
    if not _forced(forcing):
        return None
    return to_device([-1 if f is None else int(f.last(b)) for f, b in zip(forcing, blocks)], device)


def force_commits(commit: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor,
                  forced: torch.Tensor | None) -> torch.Tensor:
    """Rows with ``forced[b] > 0`` commit their ``forced[b]`` most confident masked positions (at
    least one where any is masked) instead of the rule's ``commit``; the other rows keep theirs."""
    if forced is None:
        return commit
    return torch.where((forced > 0)[:, None], commit_topk(conf, masked, forced.clamp_min(1)), commit)
