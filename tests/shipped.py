"""The shipped tiny checkpoints as the tests see them, whichever suite they were trained on.

The checkpoints in ``checkpoints/`` were trained on the basic suite (tiny/suite.py: answers of a
few tokens, decoded in about one forward a block) and are to be replaced by worked-suite ones
(tiny/worked.py: worked answers of 92-335 tokens, ~2 tokens a forward; issue #19). A test that
decodes them takes its prompts, its canvas and its threshold from here, so it means the same on
either: prompts of the suite the checkpoint was trained on (another suite's prompts are out of
its distribution), a canvas its answers end in, and a threshold at which its blocks take several
forwards.
"""

from __future__ import annotations

from pathlib import Path

from vllm_odb.tiny import suites

REPO = Path(__file__).resolve().parents[1]
TINY = {"llada": REPO / "checkpoints" / "tiny-llada", "dream": REPO / "checkpoints" / "tiny-dream"}
SUITE_NAME = suites.suite_name(str(TINY["llada"]))
SUITE = suites.get(SUITE_NAME)
WORKED = SUITE_NAME == "worked"
# A canvas the checkpoint's answers end in (with room for ALP to cut and early stop to stop).
ANSWER_GEN = 384 if WORKED else 64
# A threshold at which a block takes several forwards: the basic checkpoints decide most blocks in
# their refresh at 0.9; the worked ones commit ~2 tokens a forward there.
MULTI_STEP_THRESHOLD = 0.9 if WORKED else 1.0


def make_suite(seed: int, n: int, tasks: tuple[str, ...] | None = None) -> list:
    """``n`` examples of the shipped checkpoints' suite."""
    return SUITE.make_suite(seed, n, tasks)


def correct(prediction: str, example) -> bool:
    """The suite's verifier: the final answer and every checked step right."""
    got = SUITE.check(prediction, example)
    return bool(got["final"] and got["steps"])


def _stop_case() -> tuple[str, str, str]:
    """A prompt, a stop string of two tokens its answer holds in its first block, and how the
    answer starts: the basic suite's sort answer ("a d m" of "a d m q"); the worked suite's chain
    answer, whose first sentence starts at the first box ("I start at the rose box and follow the
    cards.", in one of several wordings: no start is fixed)."""
    if not WORKED:
        return "Sort these letters: q d m a", " m", "a d m"
    return make_suite(21, 1, ("chain",))[0].prompt, " start at", ""


STOP_CASE = _stop_case()
# Stop strings the answers hold early, one of a single token and one of two: the basic suite's
# "+" (in "8+2=10, ...") and " s"; the worked suite's "." (every sentence) and " start at" (chain's
# first sentence).
STOP_STRINGS = [".", " start at"] if WORKED else ["+", " s"]


def roomy_ridge(block_length: int, max_positions: int, requests: int) -> int:
    """A draft budget (``ridge_rows``) whose share holds every request's largest plan, whatever its
    masks: the window (+1 for Dream's shift) and 2p - 1 shared-KV drafts of two rows a masked
    position (Dream's count; LLaDA's one is within it). A request then drafts in a batch what it
    drafts alone."""
    return requests * (block_length + 1 + (2 * max_positions - 1) * 2 * block_length)
