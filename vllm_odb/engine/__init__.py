"""The vLLM engine side: per-request decoding state (requests.py), the ModelState hooking into
vLLM's V2 model runner (model_state.py), the sampler that runs the shared policy core
(sampler.py), the cache refresh (refresh.py) and knob resolution (knobs.py)."""
