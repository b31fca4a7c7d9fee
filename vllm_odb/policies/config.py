"""Decoding knobs: one validated dataclass shared by the reference loop and the vLLM sampler.

Every knob has the papers' default; a bad value raises ``ValueError`` naming the knob. ``method``
presets set several knobs at once (``vanilla`` = LLaDA's low-confidence remasking with one token
per step and no cache; ``fast-dllm`` = threshold parallel decoding on the dual cache; the ODB-dLLM,
Streaming-dLLM and Dynamic-dLLM presets are listed in ``METHODS``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

RULES = ("quota", "threshold", "factor", "adaptive")
CONFIDENCES = ("prob", "margin", "neg_entropy")
CACHES = ("none", "prefix", "dual")
SCHEDULES = ("linear", "dream")

# Named presets: what ``--method`` means. Later policies add their own rows.
METHODS: dict[str, dict] = {
    "vanilla": {"rule": "quota", "cache": "none"},
    "fast-dllm": {"rule": "threshold", "cache": "dual"},
    # ODB-dLLM's ablation ladder: + adaptive length and early termination, + jump-share, both.
    "odb-alp": {"rule": "threshold", "cache": "dual", "alp": True, "early_stop": True},
    "odb-jump": {"rule": "threshold", "cache": "dual", "jump": True, "early_stop": True},
    "odb": {"rule": "threshold", "cache": "dual", "alp": True, "early_stop": True, "jump": True},
    # Streaming-dLLM (the paper's form): prefix cache, suffix pruning, dynamic threshold, early exit.
    # The paper tunes W and alpha per model x task x length (W 32-256, alpha 0.1-0.7; LLaDA-1.5
    # GSM8K at gen 512: W=128, alpha=0.6). On our suite (gen 128, block 32) W=128 would keep the
    # whole suffix, so the preset keeps one block of look-ahead plus the final position (W=32) and
    # alpha=0.3, the paper's most common setting; pass suffix_window / threshold_alpha to change.
    "streaming": {"rule": "threshold", "cache": "prefix", "suffix_window": 32, "threshold_alpha": 0.3,
                  "early_stop": True},
    # Streaming's pruning and dynamic threshold on ODB's dual cache with jump-share (ALP is refused
    # under pruning: see suffix_window).
    "odb-streaming": {"rule": "threshold", "cache": "dual", "suffix_window": 32, "threshold_alpha": 0.3,
                      "early_stop": True, "jump": True},
    # Dynamic-dLLM: adaptive per-token thresholds (APD) with dynamic cache updating (DCU) on
    # full-sequence denoising; and each half alone (APD alone runs on the dual cache: the form the
    # vLLM engine can take up, since DCU needs per-layer partial recompute).
    "dynamic": {"rule": "adaptive", "cache": "none", "dcu": True},
    "dynamic-apd": {"rule": "adaptive", "cache": "dual"},
    "dynamic-dcu": {"rule": "threshold", "cache": "none", "dcu": True},
}


# Knobs that act only under some settings: name -> (the setting, the values under which it acts).
# A knob set explicitly (a command-line flag, a request's extra_args) where it would do nothing is
# refused by name (``DecodeConfig.check_knobs_act``) rather than silently dropped. Knobs not listed
# act in every config.
KNOB_ACTS_WHEN: dict[str, tuple[str, tuple]] = {
    "steps": ("rule", ("quota",)),
    "schedule": ("rule", ("quota",)),
    "threshold": ("rule", ("threshold", "adaptive")),
    "threshold_alpha": ("rule", ("threshold",)),
    "factor": ("rule", ("factor",)),
    **{name: ("rule", ("adaptive",)) for name in ("apd_alpha", "apd_beta", "apd_min")},
    **{name: ("alp", (True,)) for name in ("alp_threshold", "alp_min_length")},
    **{name: ("jump", (True,)) for name in ("ridge_rows", "max_draft_positions")},
    "suffix_window": ("cache", ("prefix", "dual")),
    **{name: ("dcu", (True,)) for name in ("dcu_layer_budget", "dcu_window", "dcu_prompt_interval")},
}


@dataclass(frozen=True)
class DecodeConfig:
    gen_length: int = 128
    block_length: int = 32
    # Commit rule. quota: a fixed number of tokens per step from ``schedule`` over ``steps``;
    # threshold: every masked token with confidence >= threshold (at least the best one);
    # factor: the largest n with (n + 1) * (1 - c_(n)) <= factor (at least one);
    # adaptive: Dynamic-dLLM's APD, a per-token threshold (see apd_* below).
    rule: str = "threshold"
    steps: int | None = None  # quota rule only; default gen_length (one token per step)
    schedule: str = "linear"
    threshold: float = 0.9
    factor: float = 1.0
    confidence: str = "prob"  # prob (LLaDA low_confidence, Dream maskgit_plus), margin, neg_entropy
    temperature: float = 0.0
    cache: str = "dual"
    # ODB-dLLM. Adaptive length prediction: at each refresh, cut the canvas after the block where
    # an end marker is first predicted with confidence >= alp_threshold (not before
    # alp_min_length canvas positions). Early stop: a finished block holding an end marker ends
    # the request. Jump-share: drafts verified in the same forward, as many as the draft budget
    # (ridge_rows query rows per forward for the whole batch) allows, up to max_draft_positions.
    alp: bool = False
    alp_threshold: float = 0.9
    alp_min_length: int = 0
    early_stop: bool = False
    jump: bool = False
    # Default: the H100 ridge point measured by `bench measure-ridge` (753.5 TFLOP/s bf16 matmul /
    # 2999 GB/s copy = 251 FLOP/byte; benchmarks/results/gpu/ridge-h100.json). The vLLM engine
    # takes its GPU's default budget when the knob is not given (engine/knobs.py gpu_draft_budget).
    ridge_rows: int = 251
    max_draft_positions: int = 8
    # Streaming-dLLM. Suffix pruning: a block's forwards see the prompt, the decoded blocks, the
    # block, the next suffix_window canvas positions and the final canvas position at its true
    # position id (None or 0 = the whole canvas). Needs a cache (prefix is the paper's form; on the
    # dual cache the pruned suffix is what the cache holds). ALP is refused with it: ALP reads the
    # refresh's predictions over the whole remaining canvas, which pruning removes.
    # Dynamic threshold: tau = threshold * (1 - threshold_alpha * (1 - r_mask)), r_mask = masked
    # fraction of the block plus the suffix the step sees (the kept window and final position when
    # pruning, the whole live canvas after the block otherwise); 0 = fixed threshold.
    suffix_window: int | None = None
    threshold_alpha: float = 0.0
    # Dynamic-dLLM. APD (rule='adaptive'): every block position carries its own threshold, starting
    # at ``threshold`` when its block starts and updated at each later forward of the block:
    # tau_i <- tau_i - apd_alpha * (1 - runner-up prob) + apd_beta * (1 - cos(p_t, p_{t-1})),
    # clamped to [apd_min, 1]. The paper never resets or clamps; we do both (papers.md 4.8).
    apd_alpha: float = 0.01
    apd_beta: float = 0.15
    apd_min: float = 0.5
    # DCU (dcu=true, cache='none'): per layer >= 1 only dcu_window tokens around the last
    # committed position plus the layer's budget of most-changed response tokens are recomputed;
    # the budgets share dcu_layer_budget * n_layers tokens by softmax(200 * previous layer scores).
    # dcu_prompt_interval: recompute the prompt every n-th forward (0 = only at the first).
    dcu: bool = False
    dcu_layer_budget: int = 32
    dcu_window: int = 32
    dcu_prompt_interval: int = 0

    def __post_init__(self):
        _check_int("gen_length", self.gen_length, 1)
        _check_int("block_length", self.block_length, 1)
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length}")
        _check_choice("rule", self.rule, RULES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("confidence", self.confidence, CONFIDENCES)
        _check_choice("cache", self.cache, CACHES)
        if not (_is_number(self.threshold) and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1]")
        if not (_is_number(self.factor) and self.factor > 0):
            raise ValueError(f"factor={self.factor!r} must be > 0")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature={self.temperature!r} must be >= 0")
        if self.steps is not None:
            _check_int("steps", self.steps, 1)
            if self.rule != "quota":
                raise ValueError(f"steps={self.steps} only applies to rule='quota' (rule={self.rule!r})")
            if self.steps % self.num_blocks:
                raise ValueError(f"steps={self.steps} is not a multiple of the number of blocks "
                                 f"(gen_length/block_length = {self.num_blocks})")
            if self.steps > self.gen_length:
                raise ValueError(f"steps={self.steps} exceeds gen_length={self.gen_length}")
        for name in ("alp", "early_stop", "jump"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if not (_is_number(self.alp_threshold) and 0.0 < self.alp_threshold <= 1.0):
            raise ValueError(f"alp_threshold={self.alp_threshold!r} must be in (0, 1]")
        _check_int("alp_min_length", self.alp_min_length, 0)
        _check_int("ridge_rows", self.ridge_rows, 1)
        _check_int("max_draft_positions", self.max_draft_positions, 0)
        if self.alp and self.cache == "none":
            raise ValueError("alp=true needs cache='dual' or 'prefix' (it reads the refresh forward)")
        if self.jump:
            if self.cache != "dual":
                raise ValueError(f"jump=true needs cache='dual' (cache={self.cache!r}): drafts read the suffix cache")
            if self.rule == "quota":
                raise ValueError("jump=true needs rule='threshold' or 'factor' (a fixed quota has no verification)")
            if self.ridge_rows < self.block_length:
                raise ValueError(f"ridge_rows={self.ridge_rows} is below block_length={self.block_length}: "
                                 "the draft budget must hold at least the block itself")
        self._check_streaming_dynamic()
        if self.schedule == "dream" and self.num_blocks != 1:
            raise ValueError("schedule='dream' needs block_length == gen_length (Dream decodes one block)")

    @functools.cached_property
    def step_knobs(self) -> "DecodeConfig":
        """The knobs a denoising step's decisions read (commit rule, thresholds, drafts, ALP's
        cut): this config with the canvas length set aside (and the quota rule's step count,
        which the vLLM engine does not run). Requests that differ only in length, as requests with
        different ``max_tokens`` do, decide together under it."""
        return self.replace(gen_length=self.block_length, steps=None)

    def _check_streaming_dynamic(self) -> None:
        if self.suffix_window is not None:
            _check_int("suffix_window", self.suffix_window, 0)
            if self.suffix_window and self.cache == "none":
                raise ValueError(f"suffix_window={self.suffix_window} needs cache='prefix' or 'dual' "
                                 "(pruning bounds what a cached block attends to)")
            if self.suffix_window and self.alp:
                raise ValueError(f"suffix_window={self.suffix_window} with alp=true: ALP reads the refresh's "
                                 "predictions over the whole remaining canvas, pruning keeps only the window")
        if not (_is_number(self.threshold_alpha) and 0.0 <= self.threshold_alpha <= 1.0):
            raise ValueError(f"threshold_alpha={self.threshold_alpha!r} must be in [0, 1]")
        if self.threshold_alpha and self.rule != "threshold":
            raise ValueError(f"threshold_alpha={self.threshold_alpha} applies to rule='threshold' (rule={self.rule!r})")
        for name in ("apd_alpha", "apd_beta"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not (_is_number(self.apd_min) and 0.0 < self.apd_min <= 1.0):
            raise ValueError(f"apd_min={self.apd_min!r} must be in (0, 1]")
        if self.rule == "adaptive":
            if self.apd_min > self.threshold:
                raise ValueError(f"apd_min={self.apd_min} exceeds threshold={self.threshold} (the APD start)")
            if self.jump:
                raise ValueError("jump=true with rule='adaptive': drafts would need per-branch APD state")
        if not isinstance(self.dcu, bool):
            raise ValueError(f"dcu={self.dcu!r} must be true or false")
        _check_int("dcu_layer_budget", self.dcu_layer_budget, 0)
        _check_int("dcu_window", self.dcu_window, 0)
        _check_int("dcu_prompt_interval", self.dcu_prompt_interval, 0)
        if self.dcu and self.cache != "none":
            raise ValueError(f"dcu=true runs on full-sequence denoising: it needs cache='none' (cache={self.cache!r})")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return (self.steps or self.gen_length) // self.num_blocks

    @classmethod
    def for_method(cls, method: str, **knobs) -> "DecodeConfig":
        """The ``method`` preset with ``knobs`` on top (``None`` = unset). A knob set here that the
        resulting config would ignore (``--method vanilla --threshold 0.5``) is refused by name."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
        knobs = {k: v for k, v in knobs.items() if v is not None}
        cfg = cls.from_dict({**METHODS[method], **knobs})
        cfg.check_knobs_act(knobs, method)
        return cfg

    def check_knobs_act(self, knobs: dict, method: str | None = None) -> None:
        """Refuse, naming it and the setting that idles it, a knob of ``knobs`` (those set
        explicitly) that this config ignores (``KNOB_ACTS_WHEN``): a silently dropped knob would
        look like a setting that made no difference."""
        for name, value in knobs.items():
            setting, acting = KNOB_ACTS_WHEN.get(name, (None, ()))
            if setting is None or getattr(self, setting) in acting:
                continue
            now = f"{setting}={_show(getattr(self, setting))}"
            by = f"method {method!r} ({now})" if method else now
            when = " or ".join(f"{setting}={_show(v)}" for v in acting)
            raise ValueError(f"{name}={value!r} does nothing with {by}: {name} acts only with {when}")

    @classmethod
    def from_dict(cls, knobs: dict) -> "DecodeConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(knobs) - names)
        if unknown:
            raise ValueError(f"unknown decoding knob(s) {unknown}; known: {sorted(names)}")
        return cls(**knobs)

    def replace(self, **knobs) -> "DecodeConfig":
        return dataclasses.replace(self, **knobs)


def _show(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose from {list(choices)}")
