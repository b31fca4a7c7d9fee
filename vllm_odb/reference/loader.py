"""Load a checkpoint directory for the reference engine: model, tokenizer, special ids."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from vllm_odb.checkpoint import SpecialTokens, special_tokens
from vllm_odb.reference.model import DiffusionLM, load_model


@dataclass
class Checkpoint:
    path: str
    model: DiffusionLM
    tokenizer: object
    special: SpecialTokens

    def encode_chat(self, user_message: str) -> list[int]:
        """The checkpoint's own chat template around one user turn, ready for generation."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                                  add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(path: str):
    """The checkpoint's tokenizer without running its remote code.

    AutoTokenizer would read config.json's ``auto_map`` and ask to run custom code; the official
    LLaDA tokenizer is a plain fast tokenizer and Dream's is Qwen2's BPE, so load those classes."""
    from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(path)
    if os.path.exists(os.path.join(path, "vocab.json")):
        return Qwen2TokenizerFast.from_pretrained(path)
    raise ValueError(f"{path}: no tokenizer.json or vocab.json/merges.txt")


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is not a checkpoint directory")
    model = load_model(path, dtype=dtype, device=device)
    tokenizer = load_tokenizer(path)
    gen_cfg = None
    gpath = os.path.join(path, "generation_config.json")
    if os.path.exists(gpath):
        with open(gpath) as f:
            gen_cfg = json.load(f)
    return Checkpoint(path, model, tokenizer, special_tokens(model.spec, tokenizer, gen_cfg))
