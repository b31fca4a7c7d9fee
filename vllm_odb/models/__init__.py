"""LLaDA and Dream as vLLM architectures: config classes (configs.py, importable without vLLM's
GPU parts), the vLLM model classes (diffusion_lm.py) and the engine config hook (hook.py)."""
