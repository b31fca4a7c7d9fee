"""The vLLM engine side: per-request decoding state (requests.py), the ModelState hooking into
vLLM's V2 model runner and the paged cache's side paths (model_state.py), the sampler that runs a
step through the shared policy core (sampler.py) and knob resolution (knobs.py)."""

import os

# VLLM_ODB_CHECK=1: validate every step's inputs and sync after each sampler phase, so a bad index
# raises naming the request instead of a device assert later (debugging only: it syncs the device).
CHECK = os.environ.get("VLLM_ODB_CHECK", "") not in ("", "0")

# VLLM_ODB_DEBUG_FAULTS=1: requests may ask for injected failures (extra_args "debug_fault"; engine/faults.py),
# for the reliability tests. Off: the key is an unknown knob.

# VLLM_ODB_PROFILE=path: the benchmarks' step profiler appends one JSON line per engine step
# (vllm_odb/bench/profile.py; it adds a device sync per step).
PROFILE_ENV = "VLLM_ODB_PROFILE"
# The refresh side forward's range name in a torch.profiler trace (bench profile-decode-step).
REFRESH_MARK = "odb_refresh_forward"


def step_observer():
    """The sampler's step observer: the benchmarks' step profiler when ``VLLM_ODB_PROFILE`` is set
    (its module is imported only then), else None (serving)."""
    path = os.environ.get(PROFILE_ENV)
    if not path:
        return None
    from vllm_odb.bench.profile import StepProfiler

    return StepProfiler(path)
