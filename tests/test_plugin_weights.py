"""LLaDA and Dream as vLLM architectures (CPU): every official tensor name maps to exactly one vLLM
parameter (LLaDA's OLMo names through the mapper, Dream's as they are), and ``load_weights``
fills each parameter once, with the right tensor."""

from __future__ import annotations

import dataclasses
import types

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from test_checkpoint import dream_7b_table, llada_8b_config, llada_8b_table  # noqa: E402
from vllm_odb.checkpoint import ModelSpec, expected_official_shapes, read_config  # noqa: E402
from vllm_plugin_common import TINY, plugins_loaded  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Official tensor names -> vLLM parameters
# ---------------------------------------------------------------------------------------------


def _vllm_param_names(num_layers: int, qkv_bias: bool) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names |= {p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight",
                  p + "mlp.gate_up_proj.weight", p + "mlp.down_proj.weight",
                  p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        if qkv_bias:
            names.add(p + "self_attn.qkv_proj.bias")
    return names


def _to_param(model_cls, official: str):
    """What ``load_weights`` does with a name: the mapper, then the stacking rule."""
    from vllm_odb.models.diffusion_lm import _STACKED

    name = model_cls.hf_to_vllm_mapper._map_name(official)
    if name is None:
        return None, None
    for param_part, ckpt_part, shard in _STACKED:
        if ckpt_part in name:
            return name.replace(ckpt_part, param_part), shard
    return name, None


def _model_cls(fmt):
    from vllm_odb.models.diffusion_lm import DreamForDiffusionLM, LLaDAForDiffusionLM

    return {"llada": LLaDAForDiffusionLM, "dream": DreamForDiffusionLM}[fmt]


OFFICIAL = {"llada": (llada_8b_table, 32, False), "dream": (dream_7b_table, 28, True)}


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_no_official_name_is_dropped(fmt):
    table = OFFICIAL[fmt][0]()
    dropped = [n for n in table if _to_param(_model_cls(fmt), n)[0] is None]
    assert dropped == []


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_official_names_map_to_exactly_the_vllm_parameters(fmt):
    table, layers, bias = OFFICIAL[fmt]
    mapped = {_to_param(_model_cls(fmt), n)[0] for n in table()}
    assert mapped == _vllm_param_names(layers, bias)


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_stacked_parameters_get_every_shard_once(fmt):
    shards: dict[str, list] = {}
    for n in OFFICIAL[fmt][0]():
        target, shard = _to_param(_model_cls(fmt), n)
        if shard is not None:
            shards.setdefault(target, []).append(shard)
    for target, got in shards.items():
        want = ["q", "k", "v"] if ".qkv_proj." in target else [0, 1]
        assert sorted(got, key=str) == sorted(want, key=str), target


@pytest.mark.parametrize("official, param", [
    ("model.transformer.blocks.7.ff_out.weight", "model.layers.7.mlp.down_proj.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
    ("model.transformer.blocks.3.ff_proj.weight", "model.layers.3.mlp.gate_up_proj.weight"),
    ("model.transformer.blocks.3.up_proj.weight", "model.layers.3.mlp.gate_up_proj.weight"),
    ("model.transformer.blocks.31.attn_out.weight", "model.layers.31.self_attn.o_proj.weight"),
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
])
def test_llada_name_specifics(official, param):
    assert _to_param(_model_cls("llada"), official)[0] == param


@pytest.mark.parametrize("official", ["model.layers.5.self_attn.q_proj.bias", "model.layers.5.self_attn.k_proj.bias",
                                      "model.layers.5.self_attn.v_proj.bias"])
def test_dream_qkv_bias_goes_to_qkv_proj_bias(official):
    assert _to_param(_model_cls("dream"), official)[0] == "model.layers.5.self_attn.qkv_proj.bias"


def test_dream_mapper_is_identity():
    mapper = _model_cls("dream").hf_to_vllm_mapper
    assert [n for n in dream_7b_table() if mapper._map_name(n) != n] == []


class _Recorder:
    """A stand-in vLLM parameter: records what its weight loader is called with."""

    def __init__(self):
        self.calls = []

    def weight_loader(self, param, tensor, shard=None):
        assert param is self
        self.calls.append((shard, tuple(tensor.shape)))


def _load_into_recorders(fmt, table, spec):
    """Run the real ``load_weights`` against recorder parameters (meta tensors: no memory)."""
    from vllm_odb.models.diffusion_lm import DiffusionLMForVLLM

    params = {n: _Recorder() for n in _vllm_param_names(spec.num_layers, spec.qkv_bias)}
    fake = types.SimpleNamespace(hf_to_vllm_mapper=_model_cls(fmt).hf_to_vllm_mapper, spec=spec,
                                 named_parameters=lambda: params.items())
    weights = ((n, torch.empty(s, device="meta")) for n, s in table.items())
    return DiffusionLMForVLLM.load_weights(fake, weights), params


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_load_weights_fills_every_parameter_of_the_tiny_checkpoint(fmt):
    spec = ModelSpec.from_config(read_config(str(TINY[fmt])))
    loaded, params = _load_into_recorders(fmt, expected_official_shapes(spec), spec)
    assert loaded == set(params)
    assert all(p.calls for p in params.values())


def test_load_weights_down_proj_and_lm_head_get_the_right_tensors():
    spec = ModelSpec.from_config(llada_8b_config())
    _, params = _load_into_recorders("llada", llada_8b_table(), spec)
    assert params["model.layers.0.mlp.down_proj.weight"].calls == [(None, (4096, 12288))]
    assert params["lm_head.weight"].calls == [(None, (126464, 4096))]


def test_load_weights_skips_lm_head_when_tied():
    spec = dataclasses.replace(ModelSpec.from_config(read_config(str(TINY["dream"]))), tie_word_embeddings=True)
    loaded, params = _load_into_recorders("dream", expected_official_shapes(spec) | {"lm_head.weight": (128, 256)},
                                          spec)
    assert "lm_head.weight" not in loaded
    assert params["lm_head.weight"].calls == []


def test_load_weights_unknown_tensor_raises_naming_it():
    spec = ModelSpec.from_config(read_config(str(TINY["llada"])))
    with pytest.raises(KeyError, match="model.transformer.blocks.0.bogus.weight"):
        _load_into_recorders("llada", {"model.transformer.blocks.0.bogus.weight": (4,)}, spec)
