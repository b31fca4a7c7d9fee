"""Jump-share speculative decoding (ODB-dLLM), as batched pure-torch rules.

A decode forward is memory bound: its time is set by streaming the weights, so extra query rows
are nearly free up to the GPU's ridge point. Jump-share spends them on *drafts*: copies of the
current block in which the most confident still-masked positions are already filled with their
predicted tokens. All branches (the base block and its drafts) are evaluated in one forward, each
at the block's true positions and attending to [prefix | its own rows | suffix]; the base verifies
the drafts, and the decoder jumps to the furthest verified draft plus that draft's own commits.

The pieces, each a function here:
- ``draft_family(p)``: which of the top-p positions each draft fills. For p positions: every
  single position, and every prefix {t1..tk} (k >= 2) -- 2p - 1 drafts; p = 2 gives the paper's
  phase A (3 drafts), p = 4 its phase B (7 drafts).
- ``plan_drafts``: p per request from the *draft budget* (query rows per forward at or below the
  ridge point, shared by the requests of the batch). Full-block drafts (exact) are used while they
  fit; the shared-KV layout (drafts hold only the masked positions and read the base branch's
  keys/values for the decoded ones) once it allows more drafted positions.
- ``build_drafts``: the top-p masked positions of the branch just adopted, and their tokens.
- ``branch_layout``: query rows, tokens and the attention mask among new rows, for both layouts.
- ``accept``: which draft to adopt. A draft state D is *reachable* if a chain of branch states
  {} = D0 < D1 < ... < D exists where the branch at each D_i (computed in this forward) commits
  every position of D_(i+1) \\ D_i with its drafted token. This covers the paper's a1, a12, a21,
  a123, ... cases, and every step of the chain is checked by the branch whose state it leaves
  (the released code's phase B compares t3 with t1 at one point; the chain rule cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from vllm_odb.policies.host import to_device


@lru_cache(maxsize=None)
def _family(p: int) -> tuple[tuple[int, ...], ...]:
    sets: list[tuple[int, ...]] = []
    for i in range(p):
        sets.append((i,))
        if i >= 1:
            sets.append(tuple(range(i + 1)))
    return tuple(sets)


@lru_cache(maxsize=None)
def _family_table(p: int) -> tuple[tuple[bool, ...], ...]:
    """The family's [2p - 1, p] rows on the host."""
    return tuple(tuple(i in s for i in range(p)) for s in _family(p))


_FAMILIES: dict[tuple[int, str], torch.Tensor] = {}


def draft_family(p: int, device=None) -> torch.Tensor:
    """[2p - 1, p] bool: row d says which drafted positions draft d fills (paper order). Made once
    per p and device (the engine asks every jump-share step): read-only."""
    key = (p, str(torch.device(device or "cpu")))
    fam = _FAMILIES.get(key)
    if fam is None:
        fam = to_device(_family_table(p), device or "cpu", torch.bool).reshape(max(0, 2 * p - 1), p)
        _FAMILIES[key] = _FAMILIES[(p, str(fam.device))] = fam  # as asked ("cuda") and as made ("cuda:0")
    return fam


def _family_rows(family: torch.Tensor) -> tuple[tuple[bool, ...], ...]:
    """``family``'s rows on the host: the host table of a made-once family (no device to host
    copy, which would wait for the GPU), else read back."""
    p = family.shape[1] if family.dim() == 2 else 0
    if _FAMILIES.get((p, str(family.device))) is family:
        return _family_table(p)
    return tuple(map(tuple, family.tolist()))


@dataclass(frozen=True)
class DraftBudget:
    """Query rows one forward may carry across the batch: the ridge point (peak FLOP/s over
    memory bandwidth; for a bf16 GEMM the arithmetic intensity of N rows is about N)."""

    ridge_rows: int = 251  # measured H100 ridge point, see DecodeConfig.ridge_rows
    max_positions: int = 8

    def __post_init__(self):
        if not isinstance(self.ridge_rows, int) or self.ridge_rows < 1:
            raise ValueError(f"ridge_rows={self.ridge_rows!r} must be an integer >= 1")
        if not isinstance(self.max_positions, int) or self.max_positions < 0:
            raise ValueError(f"max_positions={self.max_positions!r} must be an integer >= 0")


def plan_drafts(budget: DraftBudget, num_requests: int, window: int, masked: torch.Tensor, rows_per_mask: int = 1):
    """Per request: drafted positions p [B] and whether to use the shared-KV layout [B].

    ``window``: query rows of one branch (block length, +1 for Dream's shifted logits);
    ``masked`` [B]: masked positions left in each request's block. A request's share of the
    budget is ridge_rows // num_requests. Full-block drafts cost window * 2p rows (base + 2p - 1
    drafts); shared drafts cost at most window + (2p - 1) * m * ``rows_per_mask`` rows: a draft's
    row at each masked position, and with Dream's shifted logits (``rows_per_mask`` 2) the row
    before each, whose logits predict it. So every layout stays within the share. p never exceeds
    m - 1 (a draft that fills the whole block leaves its branch nothing to decide) nor
    ``max_positions``.
    """
    share = budget.ridge_rows // max(1, num_requests)
    m = masked.long()
    cap = (m - 1).clamp(min=0, max=budget.max_positions)
    p_full = torch.full_like(m, share // (2 * window)).clamp(max=cap)
    # Shared: window + (2p - 1) * r * m <= share  ->  p <= ((share - window) // (r * m) + 1) // 2
    room = max(0, share - window)
    p_shared = (((room // rows_per_mask) // m.clamp(min=1)) + 1) // 2  # = room // (r * m): no device op more
    p_shared = torch.where((m > 0) & (room > 0), p_shared, torch.zeros_like(m)).clamp(max=cap)
    use_shared = p_shared > p_full
    return torch.where(use_shared, p_shared, p_full), use_shared


@lru_cache(maxsize=None)
def _positions_bound(ridge_rows: int, max_positions: int, num_requests: int, window: int, block: int) -> int:
    p, _ = plan_drafts(DraftBudget(ridge_rows, max_positions), num_requests, window, torch.arange(block + 1),
                       1 + window - block)
    return int(p.max())


def positions_bound(budget: DraftBudget, num_requests: int, window: int, block: int) -> int:
    """The most positions ``plan_drafts`` lets any request draft, whatever its block's masks (0 to
    ``block``): a host number, so a plan's shapes are known without reading the device."""
    return _positions_bound(budget.ridge_rows, budget.max_positions, num_requests, window, block)


def build_drafts(x0: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, p: int):
    """Top-p masked positions by confidence and their predicted tokens.
    Returns positions [B, p] (block-relative) and tokens [B, p]; rows with fewer than p masked
    positions repeat their last valid position (callers mask those drafts out via ``n_valid``)."""
    c = conf.float().masked_fill(~masked, float("-inf"))
    order = c.argsort(dim=1, descending=True, stable=True)[:, :p]
    return order, x0.gather(1, order)


@dataclass
class BranchLayout:
    """Query rows of one jump-share forward, for a batch. Q rows per request after compaction."""

    tokens: torch.Tensor  # [B, Q] ids of each query row
    offset: torch.Tensor  # [B, Q] window offset of each row (position = window start + offset)
    branch: torch.Tensor  # [B, Q] branch id (0 = base, d + 1 = draft d), -1 for padding
    attn: torch.Tensor  # [B, Q, Q] bool: row q may attend to new row k
    pred_row: torch.Tensor  # [B, 1 + D, K] the query row whose logits predict block position t
    num_rows: torch.Tensor  # [B] real (non-padding) rows of each request


@dataclass
class Branches:
    """One jump-share step of a batch (policies/step.py ``plan_branches``): the base block and D
    drafts, and the query rows they take (``layout``)."""

    blocks: torch.Tensor  # [B, 1 + D, K] each branch's block (branch 0: the base)
    positions: torch.Tensor  # [B, p] drafted block positions
    drafted: torch.Tensor  # [B, p] their drafted tokens
    family: torch.Tensor  # [D, p] which drafted positions each draft fills
    valid: torch.Tensor  # [B, D] drafts within each request's share of the budget
    layout: BranchLayout

    @property
    def sizes(self) -> torch.Tensor:
        """[1 + D] drafted tokens each branch adopts (0 for the base)."""
        return torch.cat([torch.zeros(1, dtype=torch.long, device=self.family.device), self.family.sum(1)])


def branch_blocks(block: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
    """[B, 1 + D, K]: the base block and each draft's block (drafted positions filled)."""
    b, k = block.shape
    d = family.shape[0]
    out = block[:, None].expand(b, 1 + d, k).clone()
    fill = torch.zeros((b, d, k), dtype=torch.bool, device=block.device)
    fill.scatter_(2, positions[:, None].expand(b, d, -1), family[None].expand(b, -1, -1))
    tok = torch.zeros((b, d, k), dtype=block.dtype, device=block.device)
    tok.scatter_(2, positions[:, None].expand(b, d, -1), tokens[:, None].expand(b, d, -1))
    out[:, 1:] = torch.where(fill, tok, out[:, 1:])
    return out


def _own_rows(draft_valid: torch.Tensor, shared: torch.Tensor, base_masked: torch.Tensor, shift: int) -> torch.Tensor:
    """[B, 1 + D, W] whether each branch has a query row at window offset w (``branch_layout``)."""
    b, k = base_masked.shape
    w = k + shift
    # Window offsets a draft needs in the shared layout: masked positions and (shift) the one before.
    need = torch.zeros((b, w), dtype=torch.bool, device=base_masked.device)
    need[:, shift:] = base_masked
    if shift:
        need[:, :k] |= base_masked
    own = torch.ones((b, 1 + draft_valid.shape[1], w), dtype=torch.bool, device=base_masked.device)
    own[:, 1:] = draft_valid[:, :, None] & torch.where(shared[:, None, None], need[:, None], True)
    return own


def fitting_drafts(draft_valid: torch.Tensor, shared: torch.Tensor, base_masked: torch.Tensor, shift: int,
                   rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``draft_valid`` [B, D] with every draft of a request whose layout would take more than
    ``rows`` query rows made invalid: that request's step is a plain one (its base branch alone).
    Returns it and the rows each branch then has (``branch_layout``'s ``own``)."""
    own = _own_rows(draft_valid, shared, base_masked, shift)
    fits = own.sum((1, 2)) <= rows
    own[:, 1:] &= fits[:, None, None]
    return draft_valid & fits[:, None], own


def branch_layout(window_tokens: torch.Tensor, draft_valid: torch.Tensor, shared: torch.Tensor,
                  base_masked: torch.Tensor, shift: int, rows: int | None = None,
                  own: torch.Tensor | None = None) -> BranchLayout:
    """Lay out the base branch and D drafts as query rows.

    ``window_tokens`` [B, 1 + D, W]: each branch's tokens over the query window (W = K + shift
    positions, starting ``shift`` before the block); ``draft_valid`` [B, D]; ``shared`` [B];
    ``base_masked`` [B, K]: masked positions of the base block. In the full layout every valid
    draft has W rows and sees only its own rows. In the shared layout a draft has rows only where
    the block is masked (and, with Dream's shift, at the position before each masked one, whose
    logits predict it); for the other positions it reads the base branch's rows. The base always
    has W rows and sees only itself. Rows are then compacted so each request keeps its real rows
    first; padding rows see nothing new (the caller lets them see the prefix).

    ``rows``: lay out exactly that many rows per request (padding after the real ones), so the
    shapes are known on the host and nothing is read from the device; every request's real rows
    must fit (``fitting_drafts``, whose ``own`` may be passed). None: the longest request's real
    rows (one device read)."""
    b, nb, w = window_tokens.shape
    k = w - shift
    dev = window_tokens.device
    if own is None:
        own = _own_rows(draft_valid, shared, base_masked, shift)
    branch_id = torch.arange(nb, device=dev)[None, :, None].expand(b, nb, w)
    offs = torch.arange(w, device=dev)[None, None].expand(b, nb, w)
    flat_own = own.reshape(b, -1)
    flat_branch = branch_id.reshape(b, -1)
    flat_off = offs.reshape(b, -1)
    flat_tok = window_tokens.reshape(b, -1)
    # Visibility in the un-compacted space [B, R, R], R = nb * w.
    same = flat_branch[:, :, None] == flat_branch[:, None, :]
    base_key = flat_branch[:, None, :] == 0
    draft_query = flat_branch[:, :, None] > 0
    # A draft query reads base rows at offsets where the draft has no row of its own.
    own_at = own.reshape(b, nb, w)  # own[b, branch, offset]
    q_branch = flat_branch.clamp(min=0)
    draft_has_row = own_at.gather(1, q_branch[:, :, None].expand(b, -1, w))  # [B, R, w]
    reads_base = ~draft_has_row.gather(2, flat_off[:, None, :].expand(b, flat_own.shape[1], -1))
    attn = (same | (draft_query & base_key & reads_base)) & flat_own[:, :, None] & flat_own[:, None, :]
    # Compaction: real rows first, in order.
    order = (~flat_own).to(torch.int8).argsort(dim=1, stable=True)
    num_rows = flat_own.sum(1)
    q = int(num_rows.max()) if rows is None else rows
    if q > order.shape[1]:  # more rows than all branches have: padding past them repeats the last
        order = torch.cat([order, order[:, -1:].expand(-1, q - order.shape[1])], 1)
    order = order[:, :q]
    tokens = flat_tok.gather(1, order)
    offset = flat_off.gather(1, order)
    real = torch.arange(q, device=dev)[None] < num_rows[:, None]
    branch = torch.where(real, flat_branch.gather(1, order), -1)
    attn = attn.gather(1, order[:, :, None].expand(-1, -1, attn.shape[2])).gather(2, order[:, None, :].expand(-1, q, -1))
    attn &= real[:, :, None] & real[:, None, :]
    # Where each branch's prediction for block position t comes from: its own row at offset t
    # (window offset t holds position t - shift), else the base row at that offset.
    inverse = torch.full((b, nb * w), -1, dtype=torch.long, device=dev)
    # Padding rows (past a request's real rows, up to the longest or to ``rows``) map to nothing.
    u = min(q, nb * w)  # (columns past all branches' rows repeat one: they are padding)
    inverse.scatter_(1, order[:, :u], torch.where(real, torch.arange(q, device=dev)[None], -1)[:, :u])
    inv = inverse.view(b, nb, w)[:, :, :k]
    base_rows = inv[:, :1].expand(-1, nb, -1)
    pred_row = torch.where(inv >= 0, inv, base_rows)
    return BranchLayout(tokens, offset, branch, attn, pred_row, num_rows)


@lru_cache(maxsize=None)
def _chain_plan(family: tuple[tuple[int, ...], ...]) -> tuple[list[list[int]], list[int], list, list]:
    """accept()'s host-side plan for one family ([D, p] 0/1 rows): the drafts grouped by size
    (the chain settles each size at once: a state's strict subsets are all smaller), each state's
    size (state 0 = base), subset[src][target] (src a strict subset of target) and
    need[src][target][i] (position i is in target but not in src)."""
    states = [frozenset()] + [frozenset(i for i, f in enumerate(row) if f) for row in family]
    p = len(family[0]) if family else 0
    nb = len(states)
    subset = [[states[a] < states[t] for t in range(nb)] for a in range(nb)]
    need = [[[i in states[t] and i not in states[a] for i in range(p)] for t in range(nb)] for a in range(nb)]
    levels: dict[int, list[int]] = {}
    for i in range(1, nb):
        levels.setdefault(len(states[i]), []).append(i)
    return [levels[n] for n in sorted(levels)], [len(st) for st in states], subset, need


_PLANS: dict[tuple, tuple] = {}


def _chain_tensors(family: tuple[tuple[int, ...], ...], device) -> tuple:
    """The plan's subset/need/size tensors and level indices on ``device``, made once per family."""
    key = (family, str(device))
    if key not in _PLANS:
        levels, sizes, subset, need = _chain_plan(family)
        _PLANS[key] = ([to_device(lv, device) for lv in levels], to_device(sizes, device),
                       to_device(subset, device, torch.bool), to_device(need, device, torch.bool))
    return _PLANS[key]


def accept(commit: torch.Tensor, x0: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
           family: torch.Tensor, draft_valid: torch.Tensor) -> torch.Tensor:
    """The branch to adopt [B] (0 = base, d + 1 = draft d), by the chain rule (module doc).

    ``commit``/``x0`` [B, 1 + D, K]: each branch's commit mask and predictions from this
    forward; ``positions``/``tokens`` [B, p]: the drafted positions and tokens; ``family``
    [D, p]; ``draft_valid`` [B, D]. Among reachable drafts the one filling the most positions
    wins (ties: family order)."""
    b, nb, k = commit.shape
    d, p = family.shape
    dev = commit.device
    # v[b, branch, i]: the branch commits drafted position i with its drafted token.
    pos = positions[:, None, :].expand(b, nb, p)
    v = commit.gather(2, pos) & (x0.gather(2, pos) == tokens[:, None, :])
    # States: index 0 = base (empty set), 1..D = drafts. The subset structure is planned on the
    # host from the family's rows (the engine's families are known on the host: no read-back) and
    # sent over once per family and device.
    levels, size, subset, need = _chain_tensors(_family_rows(family), dev)
    valid = torch.cat([torch.ones((b, 1), dtype=torch.bool, device=dev), draft_valid], 1)
    # step[b, src, target]: this forward verified every position target fills beyond src, src is a
    # strict subset of target, and target is a valid state.
    step = (v[:, :, None, :] | ~need[None]).all(3) & subset[None] & valid[:, None, :]
    # Reachable from the base: the transitive closure of the steps, by boolean squaring (with the
    # identity): a chain takes at most one step per state size (``levels``), and each squaring
    # doubles the chains covered ([B, nb, nb, nb] bools a squaring: nb <= 2 * max_positions).
    closure = step | torch.eye(nb, dtype=torch.bool, device=dev)
    for _ in range(max(0, len(levels) - 1).bit_length()):
        closure = (closure[:, :, :, None] & closure[:, None, :, :]).any(2)
    reach = closure[:, 0]
    # Furthest reachable state; family order breaks ties.
    score = torch.where(reach, size[None].expand(b, -1) * nb + (nb - torch.arange(nb, device=dev))[None], -1)
    return score.argmax(1)
