"""The vLLM engine side: per-request decoding state (requests.py), the ModelState hooking into
vLLM's V2 model runner (model_state.py), the sampler that runs the shared policy core
(sampler.py), the cache refresh (refresh.py) and knob resolution (knobs.py)."""

import os

# VLLM_ODB_CHECK=1: validate every step's inputs and sync after each sampler phase, so a bad index
# raises naming the request instead of a device assert later (debugging only: it syncs the device).
CHECK = os.environ.get("VLLM_ODB_CHECK", "") not in ("", "0")
