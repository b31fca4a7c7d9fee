"""The official full-size configs (LLaDA-8B-Instruct, Dream-v0-Instruct-7B) as config.json dicts.

Used for random-init full-size models (per-step cost: weights are made on the GPU machine with
vLLM's ``load_format="dummy"``, never shipped) and by the checkpoint tests' shape tables. Values
from research/models.md (the official config.json files).
"""

from __future__ import annotations

import json
import os


CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def _config(name: str) -> dict:
    """The official checkpoint's config.json (its sizes and special ids), as shipped in
    ``bench/configs/<name>.json``."""
    with open(os.path.join(CONFIGS, f"{name}.json")) as f:
        return json.load(f)


def llada_8b_config() -> dict:
    """GSAI-ML/LLaDA-8B-Instruct's config."""
    return _config("llada-8b")


def dream_7b_config() -> dict:
    """Dream-org/Dream-v0-Instruct-7B's config."""
    return _config("dream-7b")


FULL_SIZE = {"llada-8b": llada_8b_config, "dream-7b": dream_7b_config}


def write_config_dir(name: str, path: str, max_position: int | None = None) -> str:
    """A directory holding just config.json (+ generation_config.json) for ``name``."""
    cfg = FULL_SIZE[name]()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    gen = {"eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg.get("pad_token_id")}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=1)
    return path
