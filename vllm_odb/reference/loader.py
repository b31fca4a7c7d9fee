"""Load a checkpoint directory for the reference engine: model, tokenizer, special ids."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_odb.checkpoint import (
    SpecialTokens,
    check_weights,
    load_spec,
    read_json,
    special_tokens,
)
from vllm_odb.errors import ODBError, one_line
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
        cls, files = PreTrainedTokenizerFast, ("tokenizer.json",)
    elif os.path.exists(os.path.join(path, "vocab.json")):
        cls, files = Qwen2TokenizerFast, ("vocab.json",)
    else:
        raise ODBError(f"{path}: no tokenizer (no tokenizer.json, or vocab.json and merges.txt)")
    for name in (*files, "tokenizer_config.json"):  # a malformed file: named with its line and column
        if os.path.exists(os.path.join(path, name)):
            read_json(os.path.join(path, name))
    try:
        return cls.from_pretrained(path)
    except Exception as e:  # noqa: BLE001  (the tokenizer libraries raise many types; one line names the directory)
        raise ODBError(f"{path}: the tokenizer does not load ({one_line(e)})") from None


def load_checkpoint(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> Checkpoint:
    """Model, tokenizer and special ids of a checkpoint directory. Every fault of the directory
    (not a checkpoint, malformed JSON, missing, truncated or mis-sized weights, no tokenizer) is an
    ``ODBError`` whose one line names the file."""
    spec = load_spec(path)  # the cheap checks first: config, weights' headers, tokenizer
    check_weights(path, spec)
    tokenizer = load_tokenizer(path)
    gpath = os.path.join(path, "generation_config.json")
    gen_cfg = read_json(gpath) if os.path.exists(gpath) else None
    try:
        special = special_tokens(spec, tokenizer, gen_cfg)
    except ValueError as e:
        raise ODBError(f"{path}: {e}") from None
    return Checkpoint(path, load_model(path, dtype=dtype, device=device), tokenizer, special)
