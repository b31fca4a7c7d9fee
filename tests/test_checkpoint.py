"""Checkpoint facts: config parsing, official tensor names and shapes, name mapping, save/load,
and the shipped tiny checkpoints.

The expected full-size tables are written out here from the official configs (models.md 2.1/2.2
for LLaDA-8B, 4.1/4.2 for Dream-7B), independently of ``expected_official_shapes``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vllm_odb.checkpoint import (
    ModelSpec,
    expected_official_shapes,
    internal_to_official,
    official_to_internal,
    special_tokens,
)
from vllm_odb.reference.loader import load_tokenizer
from vllm_odb.reference.model import DiffusionLM, init_weights, load_model, save_model
from vllm_odb.tiny.formats import build_tokenizer, model_config

torch.set_num_threads(2)

from vllm_odb.bench.full_size import dream_7b_config, llada_8b_config  # noqa: E402,F401  (also used by test_vllm_plugin)

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Official full-size configs and tensor tables
# ---------------------------------------------------------------------------------------------


def llada_8b_table() -> dict[str, tuple[int, ...]]:
    t = {"model.transformer.wte.weight": (126464, 4096)}
    for i in range(32):
        p = f"model.transformer.blocks.{i}."
        t[p + "attn_norm.weight"] = (4096,)
        t[p + "q_proj.weight"] = (4096, 4096)
        t[p + "k_proj.weight"] = (4096, 4096)
        t[p + "v_proj.weight"] = (4096, 4096)
        t[p + "attn_out.weight"] = (4096, 4096)
        t[p + "ff_norm.weight"] = (4096,)
        t[p + "ff_proj.weight"] = (12288, 4096)
        t[p + "up_proj.weight"] = (12288, 4096)
        t[p + "ff_out.weight"] = (4096, 12288)
    t["model.transformer.ln_f.weight"] = (4096,)
    t["model.transformer.ff_out.weight"] = (126464, 4096)
    return t


def dream_7b_table() -> dict[str, tuple[int, ...]]:
    t = {"model.embed_tokens.weight": (152064, 3584)}
    for i in range(28):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (3584,)
        t[p + "self_attn.q_proj.weight"] = (3584, 3584)
        t[p + "self_attn.q_proj.bias"] = (3584,)
        t[p + "self_attn.k_proj.weight"] = (512, 3584)
        t[p + "self_attn.k_proj.bias"] = (512,)
        t[p + "self_attn.v_proj.weight"] = (512, 3584)
        t[p + "self_attn.v_proj.bias"] = (512,)
        t[p + "self_attn.o_proj.weight"] = (3584, 3584)
        t[p + "post_attention_layernorm.weight"] = (3584,)
        t[p + "mlp.gate_proj.weight"] = (18944, 3584)
        t[p + "mlp.up_proj.weight"] = (18944, 3584)
        t[p + "mlp.down_proj.weight"] = (3584, 18944)
    t["model.norm.weight"] = (3584,)
    t["lm_head.weight"] = (152064, 3584)
    return t


def n_params(table: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in table.values())


def test_llada_8b_spec():
    spec = ModelSpec.from_config(llada_8b_config())
    assert spec.arch == "llada"
    assert spec.hidden_size == 4096
    assert spec.num_layers == 32
    assert spec.num_heads == 32
    assert spec.num_kv_heads == 32
    assert spec.head_dim == 128
    assert spec.intermediate_size == 12288
    assert spec.vocab_size == 126464
    assert spec.rope_theta == 500000.0
    assert spec.rms_norm_eps == 1e-5
    assert spec.qkv_bias is False
    assert spec.tie_word_embeddings is False
    assert spec.rope_in_fp32 is True
    assert spec.logits_shift == 0
    assert spec.mask_token_id == 126336
    assert spec.eos_token_id == 126081
    assert spec.pad_token_id == 126081
    assert spec.max_position == 4096


def test_dream_7b_spec():
    spec = ModelSpec.from_config(dream_7b_config())
    assert spec.arch == "dream"
    assert spec.hidden_size == 3584
    assert spec.num_layers == 28
    assert spec.num_heads == 28
    assert spec.num_kv_heads == 4
    assert spec.head_dim == 128
    assert spec.intermediate_size == 18944
    assert spec.vocab_size == 152064
    assert spec.rope_theta == 1000000.0
    assert spec.rms_norm_eps == 1e-6
    assert spec.qkv_bias is True
    assert spec.tie_word_embeddings is False
    assert spec.rope_in_fp32 is False
    assert spec.logits_shift == 1
    assert spec.mask_token_id == 151666
    assert spec.eos_token_id == 151643
    assert spec.pad_token_id == 151643
    assert spec.max_position == 131072


def test_llada_8b_official_shapes():
    got = expected_official_shapes(ModelSpec.from_config(llada_8b_config()))
    want = llada_8b_table()
    assert len(want) == 291
    assert set(got) == set(want)
    assert {k: tuple(v) for k, v in got.items()} == want
    assert n_params(got) == 8_015_581_184
    assert not any(k.endswith(".bias") for k in got)


def test_dream_7b_official_shapes():
    got = expected_official_shapes(ModelSpec.from_config(dream_7b_config()))
    want = dream_7b_table()
    assert len(want) == 339
    assert set(got) == set(want)
    assert {k: tuple(v) for k, v in got.items()} == want
    assert n_params(got) == 7_615_616_512


def test_spec_from_architectures_only():
    """model_type missing: the architectures list alone identifies the family."""
    cfg = llada_8b_config()
    del cfg["model_type"]
    assert ModelSpec.from_config(cfg).arch == "llada"
    cfg = dream_7b_config()
    del cfg["model_type"]
    assert ModelSpec.from_config(cfg).arch == "dream"


def test_spec_to_dict_round_trip():
    spec = ModelSpec.from_config(dream_7b_config())
    assert ModelSpec(**spec.to_dict()) == spec
    json.dumps(spec.to_dict())


# ---------------------------------------------------------------------------------------------
# Name mapping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,table", [("llada", llada_8b_table), ("dream", dream_7b_table)])
def test_name_mapping_is_bijection(arch, table):
    names = list(table())
    internal = [official_to_internal(arch, n) for n in names]
    assert len(set(internal)) == len(names)  # injective
    for official, inner in zip(names, internal):
        assert internal_to_official(arch, inner) == official
        assert official_to_internal(arch, internal_to_official(arch, inner)) == inner
    # Internal names are the HF Llama layout.
    assert all(n == "lm_head.weight" or n.startswith("model.embed_tokens.") or n.startswith("model.layers.")
               or n == "model.norm.weight" for n in internal)


def test_llada_name_mapping_specifics():
    o2i = lambda n: official_to_internal("llada", n)  # noqa: E731
    assert o2i("model.transformer.blocks.3.ff_out.weight") == "model.layers.3.mlp.down_proj.weight"
    assert o2i("model.transformer.blocks.17.ff_out.weight") == "model.layers.17.mlp.down_proj.weight"
    assert o2i("model.transformer.ff_out.weight") == "lm_head.weight"
    assert o2i("model.transformer.wte.weight") == "model.embed_tokens.weight"
    assert o2i("model.transformer.ln_f.weight") == "model.norm.weight"
    assert o2i("model.transformer.blocks.0.attn_norm.weight") == "model.layers.0.input_layernorm.weight"
    assert o2i("model.transformer.blocks.0.ff_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert o2i("model.transformer.blocks.0.attn_out.weight") == "model.layers.0.self_attn.o_proj.weight"
    assert o2i("model.transformer.blocks.0.ff_proj.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert o2i("model.transformer.blocks.0.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert o2i("model.transformer.blocks.2.k_proj.bias") == "model.layers.2.self_attn.k_proj.bias"
    assert internal_to_official("llada", "lm_head.weight") == "model.transformer.ff_out.weight"
    assert internal_to_official("llada", "model.layers.5.mlp.down_proj.weight") == \
        "model.transformer.blocks.5.ff_out.weight"


@pytest.mark.parametrize("name", [
    "model.transformer.blocks.0.unknown.weight",
    "model.transformer.wpe.weight",
    "model.transformer.blocks.0.attn_out.bias",
    "transformer.ff_out.weight",
    "model.transformer.blocks.x.q_proj.weight",
    "model.transformer.ff_out.weightX",
])
def test_llada_unknown_official_name_raises(name):
    with pytest.raises(KeyError):
        official_to_internal("llada", name)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.rotary_emb.inv_freq", "model.norm.bias", "lm_head.bias"])
def test_llada_unknown_internal_name_raises(name):
    with pytest.raises(KeyError):
        internal_to_official("llada", name)


def test_dream_names_map_to_themselves():
    for n in dream_7b_table():
        assert official_to_internal("dream", n) == n
        assert internal_to_official("dream", n) == n


@pytest.mark.parametrize("fmt,heads,kv_heads", [("llada", 4, 2), ("dream", 4, 2)])
def test_internal_names_match_model_state_dict(fmt, heads, kv_heads):
    """The official names of a spec, mapped inward, are exactly the model's parameters."""
    cfg = model_config(fmt, build_tokenizer(fmt, "basic"), hidden=64, layers=2, heads=heads, kv_heads=kv_heads,
                       mlp=128, vocab_rows=128, max_len=512)
    spec = ModelSpec.from_config(cfg)
    model = DiffusionLM(spec)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {official_to_internal(spec.arch, k): tuple(v) for k, v in expected_official_shapes(spec).items()}
    assert mapped == state


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("alibi", True),
    ("block_type", "sequential"),
    ("layer_norm_type", "default"),
    ("activation_type", "gelu"),
    ("attention_layer_norm", True),
    ("scale_logits", True),
    ("input_emb_norm", True),
    ("rope", False),
])
def test_llada_unsupported_flags(key, value):
    cfg = llada_8b_config()
    cfg[key] = value
    with pytest.raises(NotImplementedError, match=key):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("key,value", [("include_bias", True), ("bias_for_layer_norm", True),
                                       ("layer_norm_with_affine", False)])
def test_llada_unsupported_bias_and_norm_flags(key, value):
    cfg = llada_8b_config()
    cfg[key] = value
    with pytest.raises(NotImplementedError, match=key):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("key,value", [("rope_scaling", {"type": "linear", "factor": 2.0}), ("hidden_act", "gelu")])
def test_dream_unsupported_flags(key, value):
    cfg = dream_7b_config()
    cfg[key] = value
    with pytest.raises(NotImplementedError, match=key):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("make", [llada_8b_config, dream_7b_config])
def test_missing_mask_token_id(make):
    cfg = make()
    del cfg["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        ModelSpec.from_config(cfg)
    cfg["mask_token_id"] = None
    with pytest.raises(ValueError, match="mask_token_id"):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("make,key", [(llada_8b_config, "d_model"), (llada_8b_config, "n_layers"),
                                      (dream_7b_config, "hidden_size"), (dream_7b_config, "eos_token_id")])
def test_missing_required_key(make, key):
    cfg = make()
    del cfg[key]
    with pytest.raises(ValueError, match=key):
        ModelSpec.from_config(cfg)


@pytest.mark.parametrize("model_type,archs", [("llama", ["LlamaForCausalLM"]), ("qwen2", None), ("", [])])
def test_unknown_model_type(model_type, archs):
    cfg = llada_8b_config()
    cfg["model_type"] = model_type
    cfg["architectures"] = archs
    with pytest.raises(ValueError):
        ModelSpec.from_config(cfg)


def test_llada_multi_query_and_defaults():
    cfg = llada_8b_config()
    cfg["multi_query_attention"] = True
    assert ModelSpec.from_config(cfg).num_kv_heads == 1
    cfg = llada_8b_config()
    del cfg["n_kv_heads"]
    del cfg["embedding_size"]
    del cfg["mlp_hidden_size"]
    spec = ModelSpec.from_config(cfg)
    assert spec.num_kv_heads == 32
    assert spec.vocab_size == 126464
    assert spec.intermediate_size == 4 * 4096


# ---------------------------------------------------------------------------------------------
# save_model / load_model round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,heads,kv_heads", [("llada", 4, 2), ("dream", 4, 2)])
def test_save_load_round_trip(tmp_path, fmt, heads, kv_heads):
    from safetensors import safe_open

    cfg = model_config(fmt, build_tokenizer(fmt, "basic"), hidden=64, layers=2, heads=heads, kv_heads=kv_heads,
                       mlp=128, vocab_rows=128, max_len=512)
    spec = ModelSpec.from_config(cfg)
    model = DiffusionLM(spec)
    init_weights(model, std=0.05, seed=7)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    model.eval()
    path = tmp_path / fmt
    save_model(model, str(path), cfg, dtype=torch.float32)

    with open(path / "config.json") as f:
        assert json.load(f) == cfg
    expected = expected_official_shapes(spec)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert keys == set(expected)
    assert shapes == {k: tuple(v) for k, v in expected.items()}
    assert dtypes == {torch.float32}
    if fmt == "llada":
        assert "model.transformer.ff_out.weight" in keys and "lm_head.weight" not in keys

    loaded = load_model(str(path), dtype=torch.float32)
    assert loaded.spec == spec
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9))
    pos = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pos), model(ids, pos))


def test_load_model_rejects_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = model_config("dream", build_tokenizer("dream", "basic"), hidden=64, layers=2, heads=4, kv_heads=2,
                       mlp=128, vocab_rows=128, max_len=512)
    model = DiffusionLM(ModelSpec.from_config(cfg))
    save_model(model, str(tmp_path), cfg, dtype=torch.float32)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Shipped tiny checkpoints
# ---------------------------------------------------------------------------------------------

SHIPPED = {
    "llada": ("tiny-llada", "llada", ["LLaDAModelLM"], ("n_heads", "n_kv_heads"), "<|eot_id|>"),
    "dream": ("tiny-dream", "Dream", ["DreamModel"], ("num_attention_heads", "num_key_value_heads"), "<|im_end|>"),
}


@pytest.mark.parametrize("fmt", sorted(SHIPPED))
def test_shipped_checkpoint(fmt):
    from safetensors import safe_open

    dirname, model_type, archs, head_keys, eot = SHIPPED[fmt]
    path = REPO / "checkpoints" / dirname
    assert path.is_dir(), path
    with open(path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["model_type"] == model_type
    assert cfg["architectures"] == archs
    for key in head_keys:
        assert cfg[key] % 2 == 0, (key, cfg[key])
    spec = ModelSpec.from_config(cfg)
    assert spec.arch == fmt
    assert spec.num_heads % 2 == 0 and spec.num_kv_heads % 2 == 0
    assert spec.num_heads % spec.num_kv_heads == 0

    st = path / "model.safetensors"
    assert st.stat().st_size <= 16 * 1024 * 1024
    with safe_open(str(st), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {k: tuple(v) for k, v in expected_official_shapes(spec).items()}

    tok = load_tokenizer(str(path))
    assert tok.mask_token_id is not None and tok.eos_token_id is not None
    eot_id = tok.convert_tokens_to_ids(eot)
    assert eot_id is not None and eot_id != tok.unk_token_id
    assert tok.get_vocab()[eot] == eot_id
    special = special_tokens(spec, tok)
    assert special.mask_id == tok.mask_token_id
    assert special.eos_id == tok.eos_token_id
    assert tok.eos_token_id in special.end_ids
    assert eot_id in special.end_ids
    assert special.mask_id not in special.end_ids
    assert len(tok) <= spec.vocab_size
    # The config and tokenizer agree on every special id.
    assert cfg["mask_token_id"] == tok.mask_token_id
    assert cfg["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("fmt", sorted(SHIPPED))
def test_shipped_checkpoint_loads_and_runs(fmt):
    path = REPO / "checkpoints" / SHIPPED[fmt][0]
    model = load_model(str(path), dtype=torch.float32)
    tok = load_tokenizer(str(path))
    ids = torch.tensor([tok("Hello", add_special_tokens=False)["input_ids"] + [tok.mask_token_id] * 3])
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        logits = model(ids, pos)
    assert logits.shape == (1, ids.shape[1], model.spec.vocab_size)
    assert torch.isfinite(logits).all()
