"""The two tiny checkpoint formats: config.json and tokenizer files shaped like the official ones.

Tokenizers, one per suite (tiny/suites.py). The worked suite's is a byte-level BPE like the
official ones (Dream's is Qwen2's, LLaDA's a byte-level BPE too): the GPT-2 pre-tokenizer splits
words, numbers and punctuation, every byte has a token (any text encodes, losslessly), and merges
learnt from the suite make each of its words and numbers one token, so a model reads and writes
words, not characters. The basic suite's is character level (printable ASCII and newline). Both
carry the official special tokens of each family, so chat templates, mask/EOS/EOT lookups and stop strings
work exactly as with the real checkpoints, only with other ids. The embedding has more rows than
the tokenizer has tokens, as in the official checkpoints (LLaDA 126464 rows for 126349 tokens).
"""

from __future__ import annotations

import functools
import os

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # the basic suite's tokens
# The corpus the worked suite's merges are learnt from: suite examples of a seed no evaluation or training set
# uses, two wordings each, the numbers 0..999 and the chat templates' words.
TOKENIZER_SEED = 77_777
TOKENIZER_EXAMPLES = 20_000
MAX_VOCAB = 2048  # merges stop once every word of the corpus is one token (about 1800)

LLADA_SPECIALS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mdm_mask|>",
    "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
# Restated from the official LLaDA template: bos, then header/content/eot per message, and the
# assistant header appended unconditionally.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}"
)

DREAM_SPECIALS = {
    "bos": "<|beginoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mask|>",
    "extra": ["<|im_start|>", "<|im_end|>"],
}
# Qwen2.5 ChatML with its default system prompt (Dream-Instruct's template).
DREAM_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FORMATS = {"llada": (LLADA_SPECIALS, LLADA_CHAT_TEMPLATE), "dream": (DREAM_SPECIALS, DREAM_CHAT_TEMPLATE)}


def _corpus() -> list[str]:
    import random

    from vllm_odb.tiny.worked import make_suite

    rng = random.Random(TOKENIZER_SEED)
    texts = []
    for e in make_suite(TOKENIZER_SEED, TOKENIZER_EXAMPLES):
        texts += [e.prompt, e.answer, e.render(rng)]
    texts += [" ".join(str(i) for i in range(1000))] * 20
    texts += ["system\nYou are a helpful assistant.", "user", "assistant"] * 100
    return texts


# The worked suite's BPE, frozen: learnt once from the corpus above (``learn_bpe``) and kept as a
# file, so that a later change to the suite's text (its words unchanged) keeps every token id and a
# training run can continue an earlier checkpoint. tests/test_worked.py checks that every word of
# the current corpus is still one token; a new word needs a new BPE, and then training from scratch.
FROZEN_BPE = os.path.join(os.path.dirname(__file__), "worked_bpe.json")


@functools.cache
def _frozen_bpe() -> str:
    with open(FROZEN_BPE, encoding="utf-8") as f:
        return f.read()


def learn_bpe() -> str:
    """The byte-level BPE learnt from the suite corpus, serialized (what ``FROZEN_BPE`` holds, as
    learnt from the suite when it was frozen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MAX_VOCAB, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def build_tokenizer(fmt: str, suite: str = "worked"):
    """A transformers fast tokenizer for ``fmt`` ("llada" or "dream") and ``suite``: for the
    worked suite the byte-level BPE learnt from the suite (``FROZEN_BPE``); for the basic suite,
    characters."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials, template = FORMATS[fmt]
    if suite == "worked":
        tok = Tokenizer.from_str(_frozen_bpe())
    elif suite == "basic":
        tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[], ignore_merges=True))
        tok.decoder = decoders.Fuse()
    else:
        raise ValueError(f"unknown suite {suite!r}; choose from ['basic', 'worked']")
    names = [specials["bos"], specials["eos"], specials["mask"], *specials["extra"]]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        pad_token=specials["eos"],
        mask_token=specials["mask"],
        additional_special_tokens=specials["extra"],
        chat_template=template,
        clean_up_tokenization_spaces=False,
    )


def model_config(fmt: str, tokenizer, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int,
                 vocab_rows: int, max_len: int) -> dict:
    """config.json in the official key style of each family."""
    ids = tokenizer.get_vocab()
    specials = FORMATS[fmt][0]
    mask, eos, bos = ids[specials["mask"]], ids[specials["eos"]], ids[specials["bos"]]
    if vocab_rows < len(ids):
        raise ValueError(f"vocab_rows={vocab_rows} < tokenizer size {len(ids)}")
    if fmt == "llada":
        return {
            "architectures": ["LLaDAModelLM"],
            "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                         "AutoModel": "modeling_llada.LLaDAModelLM",
                         "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
            "model_type": "llada",
            "activation_type": "silu", "alibi": False, "attention_layer_norm": False,
            "attention_dropout": 0.0, "block_type": "llama", "block_group_size": 1,
            "bias_for_layer_norm": False, "d_model": hidden, "embedding_dropout": 0.0,
            "embedding_size": vocab_rows, "flash_attention": False, "include_bias": False,
            "include_qkv_bias": False, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
            "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
            "max_sequence_length": max_len, "mlp_hidden_size": mlp, "mlp_ratio": 4,
            "multi_query_attention": None, "n_heads": heads, "n_kv_heads": kv_heads, "n_layers": layers,
            "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-5, "rope": True,
            "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
            "torch_dtype": "bfloat16", "use_cache": False, "vocab_size": vocab_rows, "weight_tying": False,
            "mask_token_id": mask, "eos_token_id": eos, "pad_token_id": eos, "bos_token_id": bos,
        }
    return {
        "architectures": ["DreamModel"],
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "model_type": "Dream",
        "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": mlp, "max_position_embeddings": max_len, "max_window_layers": layers,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False,
        "use_sliding_window": False, "vocab_size": vocab_rows,
        "mask_token_id": mask, "eos_token_id": eos, "pad_token_id": eos, "bos_token_id": eos,
    }


def write_generation_config(path: str, config: dict) -> None:
    import json

    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
           "pad_token_id": config["pad_token_id"]}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
