"""The official full-size configs (LLaDA-8B-Instruct, Dream-v0-Instruct-7B) as config.json dicts.

Used for random-init full-size models (per-step cost: weights are made on the GPU machine with
vLLM's ``load_format="dummy"``, never shipped) and by the checkpoint tests' shape tables. Values
from research/models.md (the official config.json files).
"""

from __future__ import annotations

import json
import os


def llada_8b_config() -> dict:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "multi_query_attention": None,
        "mlp_hidden_size": 12288,
        "mlp_ratio": 4,
        "vocab_size": 126464,
        "embedding_size": 126464,
        "rope": True,
        "rope_theta": 500000.0,
        "rope_full_precision": True,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "block_type": "llama",
        "activation_type": "silu",
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "attention_layer_norm": False,
        "alibi": False,
        "scale_logits": False,
        "input_emb_norm": False,
        "block_group_size": 1,
        "mask_token_id": 126336,
        "eos_token_id": 126081,
        "pad_token_id": 126081,
        "max_sequence_length": 4096,
    }


def dream_7b_config() -> dict:
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "hidden_size": 3584,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "intermediate_size": 18944,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 131072,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "mask_token_id": 151666,
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "bos_token_id": 151643,
    }


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
