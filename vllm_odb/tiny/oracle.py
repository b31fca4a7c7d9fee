"""The ideal model of the suite: exact posteriors over an answer's wording, and how they decode.

A suite answer is a sequence of steps, each rendered by one of a known set of wordings with known
probabilities (tiny/worked.py ``step_renderings``), then end-of-turn and EOS to the canvas end.
Given any set of committed canvas tokens, the posterior over renderings consistent with them
follows by a forward-backward pass over (step, start position), and with it every position's
predictive distribution. A model trained to convergence on the suite approximates exactly these
marginals, so threshold decoding with them (``decode``) shows the dynamics the suite admits:
tokens per forward, how much of a block its first forward can commit, where ALP could cut. It is
a design tool for the suite (its figures are an upper bound for a trained model, which is less
sure of computed values than the oracle is), not part of any engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_odb.tiny.worked import Example, step_renderings

Lattice = list[list[tuple[tuple[int, ...], float]]]


def answer_lattice(ex: Example, tokenizer) -> Lattice:
    """Each step's wordings as token ids with their probabilities. Step boundaries fall on
    pre-token boundaries, so the tokens of a rendering are the concatenation of its steps'."""
    out = []
    for step in ex.steps:
        rend = step_renderings(step)
        texts = list(rend)
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        merged: dict[tuple[int, ...], float] = {}
        for t, i in zip(texts, ids):
            merged[tuple(i)] = merged.get(tuple(i), 0.0) + rend[t]
        out.append(list(merged.items()))
    return out


class Oracle:
    """Posterior over one answer's canvas: ``lattice`` steps, then ``end`` (end-of-turn) and
    ``fill`` (EOS) up to ``gen_length``."""

    def __init__(self, lattice: Lattice, gen_length: int, end: int, fill: int):
        self.lattice, self.g, self.end, self.fill = lattice, gen_length, end, fill
        self.alts = [[(np.array(t, dtype=np.int64), p) for t, p in step] for step in lattice]

    def _fits(self, tokens: np.ndarray, starts: np.ndarray, committed: np.ndarray) -> np.ndarray:
        """[len(starts)] bool: ``tokens`` placed at each start agrees with the committed tokens."""
        n = len(tokens)
        ok = starts + n <= self.g
        idx = np.minimum(starts[:, None] + np.arange(n)[None], self.g - 1)
        seen = committed[idx]
        return ok & ((seen < 0) | (seen == tokens[None])).all(1)

    def _tail(self, committed: np.ndarray) -> np.ndarray:
        """[g + 1]: the answer ending at s (end marker at s, EOS after) agrees with the commits."""
        ok = np.zeros(self.g + 1, dtype=bool)
        eos_ok = (committed < 0) | (committed == self.fill)
        fill_ok = np.append(np.flip(np.cumprod(np.flip(eos_ok))).astype(bool), True)  # all EOS-able from p on
        s = np.arange(self.g)
        ok[:self.g] = ((committed[s] < 0) | (committed[s] == self.end)) & fill_ok[s + 1]
        return ok

    def marginals(self, committed: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """Per canvas position: the most likely token and its probability, given ``committed``
        ([g] ids, -1 where masked)."""
        g, steps = self.g, len(self.alts)
        alpha = np.zeros((steps + 1, g + 1))
        alpha[0, 0] = 1.0
        fits = []  # per step: per alternative, the starts it may take and its fit there
        for i, alts in enumerate(self.alts):
            starts = np.flatnonzero(alpha[i] > 0)
            row = []
            for tok, p in alts:
                f = self._fits(tok, starts, committed)
                np.add.at(alpha[i + 1], starts[f] + len(tok), alpha[i, starts[f]] * p)
                row.append((starts[f], p))
            fits.append(row)
        tail = self._tail(committed)
        beta = np.zeros((steps + 1, g + 1))
        beta[steps] = tail
        for i in range(steps - 1, -1, -1):
            for (tok, p), (starts, _) in zip(self.alts[i], fits[i]):
                np.add.at(beta[i], starts, p * beta[i + 1, starts + len(tok)])
        z = beta[0, 0]
        if z <= 0:
            raise ValueError("the committed tokens fit no rendering of this answer")
        marg = np.zeros((g, vocab))
        for i in range(steps):
            for (tok, p), (starts, _) in zip(self.alts[i], fits[i]):
                w = alpha[i, starts] * p * beta[i + 1, starts + len(tok)] / z
                keep = w > 0
                if not keep.any():
                    continue
                pos = starts[keep][:, None] + np.arange(len(tok))[None]
                np.add.at(marg, (pos.ravel(), np.broadcast_to(tok, pos.shape).ravel()),
                          np.repeat(w[keep], len(tok)))
        w_end = alpha[steps, :g] * tail[:g] / z
        marg[np.arange(g), self.end] += w_end
        marg[:, self.fill] += np.cumsum(np.append(0.0, w_end[:-1]))  # EOS after an end at s < p
        return marg.argmax(1), marg.max(1)


@dataclass
class Decoded:
    nfe: int  # forwards up to the block holding the end marker
    response: int  # tokens before the end marker
    commits: list[list[int]]  # per block: tokens committed by each forward
    eos_cut: int | None  # canvas position where ALP (EOS >= threshold) would first cut, at block 0


def decode(oracle: Oracle, vocab: int, block: int = 32, threshold: float = 0.9) -> Decoded:
    """Fast-dLLM threshold decoding with the oracle's marginals, ending after the block that
    holds the end marker (early stop)."""
    g = oracle.g
    committed = np.full(g, -1, dtype=np.int64)
    nfe, commits, eos_cut = 0, [], None
    for b in range(0, g, block):
        per_block = []
        while (committed[b:b + block] < 0).any():
            x0, conf = oracle.marginals(committed, vocab)
            if b == 0 and not per_block:
                hit = np.flatnonzero((x0 == oracle.fill) & (conf >= threshold))
                eos_cut = int(hit[0]) if len(hit) else None
            masked = committed[b:b + block] < 0
            take = masked & (conf[b:b + block] >= threshold)
            best = np.argmax(np.where(masked, conf[b:b + block], -1.0))
            take[best] = True
            committed[b:b + block][take] = x0[b:b + block][take]
            nfe += 1
            per_block.append(int(take.sum()))
        commits.append(per_block)
        if (committed[b:b + block] == oracle.end).any():
            break
    ends = np.flatnonzero(committed == oracle.end)
    return Decoded(nfe, int(ends[0]) if len(ends) else g, commits, eos_cut)
