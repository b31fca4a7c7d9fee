"""The vLLM plugin on CPU: entry point and registration, weight names, engine knobs, the request
validation and scheduler patches, the config classes, the engine config hook and the per-request
table. No GPU, no network: vLLM's config path runs on its CPU platform (see ``cpu_vllm``).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re
import types
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402

import vllm_odb  # noqa: E402
from test_checkpoint import dream_7b_config, dream_7b_table, llada_8b_config, llada_8b_table  # noqa: E402
from vllm_odb import patches  # noqa: E402
from vllm_odb.checkpoint import ModelSpec, expected_official_shapes, read_config  # noqa: E402
from vllm_odb.engine.knobs import canvas_width, engine_config, live_gen_length, request_config  # noqa: E402
from vllm_odb.engine.requests import RequestTable  # noqa: E402
from vllm_odb.models.configs import DreamConfig, LLaDAConfig  # noqa: E402
from vllm_odb.models.hook import ODBConfigHook  # noqa: E402
from vllm_odb.patches.scheduler_lookahead import canvas_end  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
TINY = {"llada": REPO / "checkpoints" / "tiny-llada", "dream": REPO / "checkpoints" / "tiny-dream"}
CONFIG_CLASS = {"llada": LLaDAConfig, "dream": DreamConfig}
SHIFT = {"llada": 0, "dream": 1}
ARCHS = ("LLaDAModelLM", "DreamModel")
ODB = {"odb": {"block_length": 16, "gen_length": 64}}


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    """What every vLLM process does at start: run the ``vllm.general_plugins`` entry points."""
    import vllm.plugins

    vllm.plugins.load_general_plugins()


def _engine():
    return engine_config(ODB)


def _hf_config(fmt: str, engine=None):
    """The tiny checkpoint's config as vLLM loads it, with the engine knobs the hook would set."""
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    engine = engine or _engine()
    cfg.odb_engine = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
    cfg.canvas_length = canvas_width(engine, SHIFT[fmt])
    return cfg


# ---------------------------------------------------------------------------------------------
# 1. Entry point and registration
# ---------------------------------------------------------------------------------------------


def test_entry_point_is_declared():
    eps = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "odb"]
    assert len(eps) == 1
    assert eps[0].value == "vllm_odb:register"
    assert eps[0].load() is vllm_odb.register


def test_load_general_plugins_registers_both_architectures():
    supported = set(vllm.ModelRegistry.get_supported_archs())
    assert set(ARCHS) <= supported


@pytest.mark.parametrize("arch", ARCHS)
def test_registered_architecture_points_at_our_class(arch):
    target = vllm.ModelRegistry.models[arch]
    module, cls = vllm_odb.ARCHITECTURES[arch].split(":")
    assert (target.module_name, target.class_name) == (module, cls)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_hook_registered(arch):
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    assert MODELS_CONFIG_MAP[arch] is ODBConfigHook


@pytest.mark.parametrize("model_type, cls", [("llada", LLaDAConfig), ("Dream", DreamConfig)])
def test_config_classes_registered(model_type, cls):
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    assert _CONFIG_REGISTRY[model_type] is cls


def test_patches_applied():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    assert getattr(SamplingParams._validate_diffusion, "_odb_patched", False)
    assert getattr(Scheduler.__init__, "_odb_patched", False)
    assert getattr(GPUModelRunner.initialize_kv_cache, "_odb_patched", False)


def test_runner_patch_hands_block_tables_to_our_model_state_only():
    import types

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_odb.patches import runner_block_tables

    patched = GPUModelRunner.initialize_kv_cache
    runner_block_tables.apply()  # a second apply does not wrap again
    assert GPUModelRunner.initialize_kv_cache is patched
    calls, got = [], []
    wrapped = runner_block_tables.wrap(lambda runner, cfg: calls.append(cfg))
    tables = object()
    for state in (types.SimpleNamespace(attach_block_tables=got.append), types.SimpleNamespace()):
        wrapped(types.SimpleNamespace(model_state=state, block_tables=tables), "cfg")
    assert calls == ["cfg", "cfg"]  # vLLM's own body always runs
    assert got == [tables]  # and only our model state is handed the tables


def test_register_is_idempotent(monkeypatch):
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.core.sched.scheduler import Scheduler

    def snapshot():
        return (SamplingParams._validate_diffusion, Scheduler.__init__,
                [vllm.ModelRegistry.models[a] for a in ARCHS], [MODELS_CONFIG_MAP[a] for a in ARCHS])

    before = snapshot()
    vllm_odb.register()
    assert snapshot() == before
    # Even a second full pass (a fresh module flag) must not wrap the patched functions twice.
    monkeypatch.setattr(vllm_odb, "_registered", False)
    vllm_odb.register()
    assert snapshot() == before


def test_patch_apply_twice_does_not_rewrap():
    from vllm_odb.patches import diffusion_params, scheduler_lookahead
    from vllm.v1.core.sched.scheduler import Scheduler

    validate, init = SamplingParams._validate_diffusion, Scheduler.__init__
    diffusion_params.apply()
    scheduler_lookahead.apply()
    assert SamplingParams._validate_diffusion is validate
    assert Scheduler.__init__ is init


# ---------------------------------------------------------------------------------------------
# 2. Official tensor names -> vLLM parameters
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


# ---------------------------------------------------------------------------------------------
# 3. Engine and request knobs
# ---------------------------------------------------------------------------------------------


def test_engine_config_good_values():
    cfg = engine_config({"odb": {"block_length": 16, "gen_length": 64, "threshold": 0.8}})
    assert (cfg.block_length, cfg.gen_length, cfg.threshold, cfg.rule, cfg.cache) == (16, 64, 0.8, "threshold", "dual")


@pytest.mark.parametrize("additional", [None, {}, {"other_plugin": {"x": 1}}])
def test_engine_config_defaults(additional):
    cfg = engine_config(additional)
    assert (cfg.block_length, cfg.gen_length, cfg.rule, cfg.cache) == (32, 128, "threshold", "dual")


def test_engine_config_factor_rule_allowed():
    assert engine_config({"odb": {"rule": "factor", "factor": 2.0}}).rule == "factor"


@pytest.mark.parametrize("section, name", [
    ({"bogus": 1}, "bogus"),
    ({"rule": "quota"}, "rule"),
    ({"method": "vanilla"}, "rule"),  # the preset is rule='quota', cache='none'
    ({"cache": "none"}, "cache"),
    ({"cache": "prefix"}, "cache"),
    ({"jump": True, "ridge_rows": 8}, "ridge_rows"),
    ({"alp_threshold": 0}, "alp_threshold"),
    ({"alp": "yes"}, "alp"),
    ({"temperature": 0.5}, "temperature"),
    ({"threshold": 2}, "threshold"),
    ({"method": "nope"}, "method"),
    ({"gen_length": 40, "block_length": 16}, "gen_length"),
])
def test_engine_config_errors_name_the_knob(section, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        engine_config({"odb": section})


@pytest.mark.parametrize("section", [[1], "x", 3])
def test_engine_config_section_must_be_an_object(section):
    with pytest.raises(ValueError, match="additional_config.odb"):
        engine_config({"odb": section})


@pytest.mark.parametrize("method, jump", [("odb-alp", False), ("odb", True), ("odb-jump", True)])
def test_engine_runs_the_odb_methods(method, jump):
    cfg = engine_config({"odb": {"method": method}})
    assert (cfg.alp, cfg.early_stop, cfg.jump) == (method != "odb-jump", True, jump)


@pytest.mark.parametrize("section, width", [({}, 16), ({"method": "odb"}, 251), ({"method": "odb", "ridge_rows": 64}, 64),
                                            ({"method": "odb", "ridge_rows": 16}, 16)])
def test_canvas_width_holds_the_draft_budget(section, width):
    cfg = engine_config({"odb": {"block_length": 16, **section}})
    assert canvas_width(cfg, 0) == width
    assert canvas_width(cfg, 1) == (max(2 * width - 17, 17) if cfg.jump else 17)  # Dream: rows before masks


ENGINE = engine_config({"odb": {"block_length": 16, "gen_length": 64, "threshold": 0.8}})


def test_request_method_odb_alp_runs_on_a_plain_engine():
    cfg = request_config(ENGINE, {"method": "odb-alp", "alp_threshold": 0.7}, 0.0, None)
    assert (cfg.alp, cfg.alp_threshold, cfg.early_stop, cfg.jump, cfg.threshold) == (True, 0.7, True, False, 0.8)


JUMP_ENGINE = engine_config({"odb": {"block_length": 16, "gen_length": 64, "method": "odb"}})


@pytest.mark.parametrize("extra, jump", [(None, True), ({"method": "fast-dllm"}, False), ({"jump": False}, False)])
def test_request_on_a_jump_share_engine(extra, jump):
    assert request_config(JUMP_ENGINE, extra, 0.0, None).jump == jump


@pytest.mark.parametrize("max_tokens, gen", [(100, 112), (16, 16), (17, 32), (1, 16), (0, 16), (None, 64)])
def test_request_gen_length_default(max_tokens, gen):
    assert request_config(ENGINE, None, 0.0, max_tokens).gen_length == gen


def test_request_explicit_gen_length_wins_over_max_tokens():
    assert request_config(ENGINE, {"gen_length": 48}, 0.0, 100).gen_length == 48


def test_request_keeps_engine_knobs():
    cfg = request_config(ENGINE, {"block_length": 16}, 0.0, None)
    assert (cfg.block_length, cfg.threshold) == (16, 0.8)


def test_request_method_preset_keeps_block_length_and_threshold():
    cfg = request_config(ENGINE, {"method": "fast-dllm"}, 0.0, None)
    assert (cfg.block_length, cfg.threshold, cfg.rule, cfg.cache) == (16, 0.8, "threshold", "dual")


def test_request_temperature_comes_from_sampling_params():
    assert request_config(ENGINE, None, 0.7, None).temperature == 0.7


@pytest.mark.parametrize("extra, name", [
    ({"block_length": 32}, "block_length"),
    ({"bogus": 1}, "bogus"),
    ({"threshold": 0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"gen_length": 40}, "gen_length"),
    ({"temperature": 0.5}, "temperature"),
    ({"method": "vanilla"}, "rule"),
    ({"jump": True}, "jump"),
    ({"method": "odb"}, "jump"),  # jump-share needs an engine whose canvas holds the drafts
    ({"alp_min_length": -1}, "alp_min_length"),
    ({"cache": "none"}, "cache"),
    ({"steps": 4}, "steps"),
])
def test_request_errors_name_the_knob(extra, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        request_config(ENGINE, extra, 0.0, None)


@pytest.mark.parametrize("prompt, max_len, shift, gen", [
    (10, 512, 0, 64),  # room to spare: the whole gen_length
    (100, 164, 0, 64),  # exactly fits
    (100, 164, 1, 48),  # the shift costs the last block
    (100, 150, 0, 48),  # cut to whole blocks
    (100, 110, 0, 0),  # not one block fits
    (600, 512, 0, 0),  # prompt already past max_model_len
])
def test_live_gen_length(prompt, max_len, shift, gen):
    assert live_gen_length(_engine(), prompt, max_len, shift) == gen


# ---------------------------------------------------------------------------------------------
# 4. The request validation patch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odb_model_config():
    return types.SimpleNamespace(is_diffusion=True, hf_config=_hf_config("llada"))


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_validation_accepts_any_temperature(odb_model_config, temperature):
    SamplingParams(temperature=temperature, max_tokens=32)._validate_diffusion(odb_model_config)


def test_validation_accepts_good_knobs(odb_model_config):
    SamplingParams(temperature=0, extra_args={"threshold": 0.7, "rule": "factor"})._validate_diffusion(
        odb_model_config)


@pytest.mark.parametrize("extra, name", [({"bogus": 1}, "bogus"), ({"threshold": 1.5}, "threshold"),
                                         ({"block_length": 32}, "block_length"), ({"jump": True}, "jump")])
def test_validation_bad_knob_names_it(odb_model_config, extra, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SamplingParams(temperature=0, extra_args=extra)._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("kwargs, name", [
    ({"seed": 1}, "seed"),
    ({"logprobs": 1}, "logprobs"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"min_p": 0.1}, "min_p"),
    ({"min_tokens": 1}, "min_tokens"),
    ({"logit_bias": {1: 1.0}}, "logit_bias"),
    ({"bad_words": ["x"]}, "bad_words"),
    ({"allowed_token_ids": [1]}, "allowed_token_ids"),
])
def test_validation_refused_params_name_them(odb_model_config, kwargs, name):
    params = SamplingParams(temperature=0.7, **kwargs)  # not greedy: vLLM resets min_p when greedy
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        params._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("max_tokens, want", [(100, 32), (None, 32), (10, 10)])
def test_validation_caps_max_tokens_at_explicit_gen_length(odb_model_config, max_tokens, want):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args={"gen_length": 32})
    params._validate_diffusion(odb_model_config)
    assert params.max_tokens == want


def test_validation_leaves_max_tokens_without_gen_length(odb_model_config):
    params = SamplingParams(temperature=0, max_tokens=100)
    params._validate_diffusion(odb_model_config)
    assert params.max_tokens == 100


def test_other_diffusion_models_keep_vllm_check():
    other = types.SimpleNamespace(is_diffusion=True,
                                  hf_config=LLaDAConfig.from_pretrained(str(TINY["llada"])))  # no odb_engine
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)._validate_diffusion(other)
    SamplingParams(temperature=1.0)._validate_diffusion(other)  # vLLM's one allowed temperature


def test_non_diffusion_models_untouched():
    other = types.SimpleNamespace(is_diffusion=False, hf_config=types.SimpleNamespace())
    SamplingParams(temperature=0, seed=1)._validate_diffusion(other)


# ---------------------------------------------------------------------------------------------
# 5. Version check
# ---------------------------------------------------------------------------------------------


def test_version_check_refuses_other_versions():
    with pytest.raises(RuntimeError) as e:
        patches.check_vllm_version("0.25.1")
    assert "0.25.1" in str(e.value) and "0.26.0" in str(e.value)


def test_version_check_accepts_supported():
    patches.check_vllm_version("0.26.0")
    patches.check_vllm_version()  # the installed one


def test_apply_all_refuses_other_versions(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.25.1")
    with pytest.raises(RuntimeError, match=re.escape("0.25.1")):
        patches.apply_all()


# ---------------------------------------------------------------------------------------------
# 6. Config classes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kv_heads", [("llada", 4), ("dream", 2)])
def test_tiny_config_standard_names(fmt, kv_heads):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    got = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers,
           cfg.intermediate_size, cfg.vocab_size, cfg.head_dim)
    assert got == (256, 4, kv_heads, 8, 768, 128, 64)


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_tiny_config_default_canvas_length(fmt):
    assert CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt])).canvas_length == 32 + SHIFT[fmt]


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_tiny_config_spec_matches_checkpoint_parser(fmt):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    assert cfg.spec == ModelSpec.from_config(read_config(str(TINY[fmt])))


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_config_round_trips_through_to_dict(fmt):
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    cfg.canvas_length = 17
    again = CONFIG_CLASS[fmt].from_dict(cfg.to_dict())
    assert (again.spec, again.canvas_length) == (cfg.spec, 17)


@pytest.mark.parametrize("cls", [LLaDAConfig, DreamConfig])
def test_bare_config_constructs(cls):
    cls()


def test_llada_8b_config_sizes():
    cfg = LLaDAConfig.from_dict(llada_8b_config())
    got = (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.mask_token_id, cfg.canvas_length)
    assert got == (126464, 32, 4096, 32, 32, 128, 12288, 126336, 32)
    assert cfg.spec == ModelSpec.from_config(llada_8b_config())


def test_dream_7b_config_sizes():
    cfg = DreamConfig.from_dict(dream_7b_config())
    got = (cfg.vocab_size, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
           cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, cfg.mask_token_id, cfg.canvas_length)
    assert got == (152064, 28, 3584, 28, 4, 128, 18944, 151666, 33)
    assert cfg.spec == ModelSpec.from_config(dream_7b_config())


# ---------------------------------------------------------------------------------------------
# 7. The engine config hook, end to end on vLLM's CPU platform
# ---------------------------------------------------------------------------------------------


def _cpu_shims(mp: pytest.MonkeyPatch) -> None:
    import vllm.config.vllm as vllm_config_module
    import vllm.engine.arg_utils as arg_utils
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    cpu = CpuPlatform()
    mp.setattr(platforms, "_current_platform", cpu)
    mp.setattr(arg_utils, "current_platform", cpu)  # bound at import (the plugin imports it early)
    mp.setattr(vllm_config_module, "HAS_TRITON", True)  # the diffusion path checks Triton (MRv2)


def _create(fmt: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(TINY[fmt]), dtype="float32", max_model_len=512, additional_config=ODB)
    return EngineArgs(**{**args, **kwargs}).create_engine_config()


@pytest.fixture
def cpu_vllm(monkeypatch):
    _cpu_shims(monkeypatch)


@pytest.fixture(scope="module", params=["llada", "dream"])
def engine_vc(request):
    with pytest.MonkeyPatch.context() as mp:
        _cpu_shims(mp)
        return request.param, _create(request.param)


def test_hook_canvas_length(engine_vc):
    fmt, vc = engine_vc
    assert vc.diffusion_config.canvas_length == 16 + SHIFT[fmt]


def test_hook_speculative_tokens_are_the_canvas(engine_vc):
    _, vc = engine_vc
    assert vc.num_speculative_tokens == vc.diffusion_config.canvas_length


def test_hook_hf_config_canvas_length(engine_vc):
    fmt, vc = engine_vc
    assert isinstance(vc.model_config.hf_config, CONFIG_CLASS[fmt])
    assert vc.model_config.hf_config.canvas_length == 16 + SHIFT[fmt]


def test_hook_attention(engine_vc):
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _, vc = engine_vc
    assert vc.attention_config.backend == AttentionBackendEnum.TRITON_ATTN
    assert vc.attention_config.use_non_causal


def test_hook_no_prefix_caching_no_chunked_prefill(engine_vc):
    _, vc = engine_vc
    assert not vc.cache_config.enable_prefix_caching
    assert not vc.scheduler_config.enable_chunked_prefill


def test_hook_token_budget_holds_a_prompt(engine_vc):
    _, vc = engine_vc
    assert vc.scheduler_config.max_num_batched_tokens >= vc.model_config.max_model_len


def test_hook_default_max_num_seqs(engine_vc):
    _, vc = engine_vc
    assert vc.scheduler_config.max_num_seqs == 64


def test_hook_cudagraph_sizes_cover_the_batch(engine_vc):
    _, vc = engine_vc
    assert vc.compilation_config.max_cudagraph_capture_size == 64 * vc.diffusion_config.canvas_length


def test_hook_default_max_tokens_is_gen_length(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.override_generation_config["max_new_tokens"] == 64


def test_hook_sets_engine_knobs_on_hf_config(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.hf_config.odb_engine["block_length"] == 16
    assert vc.model_config.hf_config.odb_engine == dataclasses.asdict(_engine())


def test_hook_runner_is_generate(engine_vc):
    _, vc = engine_vc
    assert vc.model_config.runner_type == "generate"
    assert vc.model_config.is_diffusion


def test_hook_bad_knob_names_it(cpu_vllm):
    with pytest.raises(ValueError, match="threshold"):
        _create("llada", additional_config={"odb": {"threshold": 2}})


@pytest.mark.parametrize("fmt, canvas", [("llada", 8), ("dream", 16)])  # Dream's canvas is block + 1
def test_hook_disagreeing_canvas_length_raises(cpu_vllm, fmt, canvas):
    with pytest.raises(ValueError, match="canvas_length"):
        _create(fmt, diffusion_config={"canvas_length": canvas})


def test_hook_agreeing_canvas_length_accepted(cpu_vllm):
    assert _create("dream", diffusion_config={"canvas_length": 17}).diffusion_config.canvas_length == 17


def test_hook_refuses_flashinfer(cpu_vllm):
    with pytest.raises(ValueError, match="FLASHINFER"):
        _create("llada", attention_backend="FLASHINFER")


def test_hook_turns_requested_prefix_caching_off(cpu_vllm):
    assert not _create("llada", enable_prefix_caching=True).cache_config.enable_prefix_caching


def test_hook_keeps_user_max_new_tokens(cpu_vllm):
    vc = _create("llada", override_generation_config={"max_new_tokens": 32})
    assert vc.model_config.override_generation_config["max_new_tokens"] == 32


def test_hook_keeps_a_lower_max_num_seqs(cpu_vllm):
    assert _create("llada", max_num_seqs=100).scheduler_config.max_num_seqs == 100


def test_hook_caps_vllm_default_sized_max_num_seqs(cpu_vllm):
    """Documented (models/hook.py): values >= vLLM's default (128) are cut to 64 (logits memory)."""
    assert _create("llada", max_num_seqs=256).scheduler_config.max_num_seqs == 64


# ---------------------------------------------------------------------------------------------
# 8. The scheduler patch's canvas end
# ---------------------------------------------------------------------------------------------


def _request(prompt_len, max_tokens, extra_args=None):
    return types.SimpleNamespace(num_prompt_tokens=prompt_len, sampling_params=SamplingParams(
        temperature=0, max_tokens=max_tokens, extra_args=extra_args))


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_canvas_end_is_prompt_plus_gen(fmt):
    assert canvas_end(_request(10, 20), _hf_config(fmt), 512) == 10 + 32  # max_tokens 20 -> 2 blocks


@pytest.mark.parametrize("fmt, end", [("llada", 164), ("dream", 148)])
def test_canvas_end_cut_by_max_model_len(fmt, end):
    assert canvas_end(_request(100, 200, {"gen_length": 64}), _hf_config(fmt), 164) == end


def test_canvas_end_uses_engine_gen_length_without_max_tokens():
    assert canvas_end(_request(10, None), _hf_config("llada"), 512) == 10 + 64


def test_canvas_end_is_cached_on_the_request():
    req = _request(10, 20)
    end = canvas_end(req, _hf_config("llada"), 512)
    assert req._odb_canvas_end == end
    req.num_prompt_tokens = 300
    assert canvas_end(req, _hf_config("llada"), 512) == end


# ---------------------------------------------------------------------------------------------
# 9. The per-request table
# ---------------------------------------------------------------------------------------------

MASK, EOS = 98, 97


@pytest.fixture
def table():
    return RequestTable(4, 128, _engine(), 0, mask_id=MASK, eos_id=EOS, markers=[], device="cpu")


def test_table_new_request_row(table):
    req = table.add(0, "a", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20))
    row = table.tokens[0].tolist()
    assert row[:3] == [1, 2, 3]
    assert set(row[3:]) == {MASK}
    assert (req.start, req.end, req.finished) == (3, 3 + 32, False)


def test_table_request_knobs(table):
    req = table.add(0, "a", [1, 2, 3], None, SamplingParams(temperature=0.5, max_tokens=20,
                                                            extra_args={"threshold": 0.7}))
    assert (req.cfg.threshold, req.cfg.temperature, req.cfg.gen_length) == (0.7, 0.5, 32)


def test_table_warmup_request_finishes_at_once(table):
    req = table.add(1, "_warmup_0", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20))
    assert req.finished
    assert set(table.tokens[1, 3:].tolist()) == {EOS}
    assert table.tokens[1, :3].tolist() == [1, 2, 3]


def test_table_resumed_request_starts_after_committed_block(table):
    req = table.add(2, "b", [1, 2, 3], [1, 2, 3] + [5] * 16, SamplingParams(temperature=0, max_tokens=20))
    assert (req.prompt_len, req.start, req.end, req.finished) == (3, 19, 35, False)
    assert table.tokens[2, :19].tolist() == [1, 2, 3] + [5] * 16
    assert set(table.tokens[2, 19:].tolist()) == {MASK}


def test_table_fully_committed_resumed_request_is_finished(table):
    req = table.add(2, "b", [1, 2, 3], [1, 2, 3] + [5] * 32, SamplingParams(temperature=0, max_tokens=20))
    assert req.finished


def test_table_request_without_room_is_finished(table):
    req = table.add(0, "long", list(range(120)), None, SamplingParams(temperature=0, max_tokens=20))
    assert (req.gen, req.finished) == (0, True)


def test_table_invalid_knobs_are_logged_and_finished(table, caplog):
    with caplog.at_level(logging.ERROR, logger="vllm_odb.engine.requests"):
        req = table.add(3, "c", [1, 2, 3], None,
                        SamplingParams(temperature=0, max_tokens=20, extra_args={"bogus": 1}))
    assert req.finished
    assert set(table.tokens[3, 3:].tolist()) == {EOS}
    assert "bogus" in caplog.text


def test_table_remove_frees_the_slot(table):
    table.add(0, "a", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20))
    table.remove("a")
    assert table.get(0) is None
    assert "a" not in table.slot_of


def test_table_slot_lookup(table):
    req = table.add(2, "a", [1], None, SamplingParams(temperature=0, max_tokens=20))
    assert table.slot_of["a"] == 2
    assert table.get(2) is req
    assert table.get(-1) is None and table.get(4) is None


# ---------------------------------------------------------------------------------------------
# 10. "odb" as a speculative method (patches/speculative_odb.py)
# ---------------------------------------------------------------------------------------------


def test_speculative_config_odb_constructs():
    from vllm.config.speculative import SpeculativeConfig

    assert SpeculativeConfig(method="odb").method == "odb"


def test_speculative_config_other_methods_still_validated():
    from vllm.config.speculative import SpeculativeConfig

    with pytest.raises(Exception, match="num_speculative_tokens|literal|Input should be"):
        SpeculativeConfig(method="not-a-method")


def _cli(argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"] + argv))


@pytest.mark.parametrize("argv, spec, method", [
    (["--speculative", "odb"], {"method": "odb"}, None),
    (["--speculative-config", '{"method": "odb", "threshold": 0.8}'], {"method": "odb", "threshold": 0.8}, None),
    (["--speculative-config", '{"threshold": 0.8}', "--speculative", "odb"], {"method": "odb", "threshold": 0.8}, None),
    (["--spec-method", "odb"], None, "odb"),
])
def test_cli_selects_odb(cpu_vllm, argv, spec, method):
    args = _cli(argv)
    assert (args.speculative_config, args.spec_method) == (spec, method)


def test_cli_shorthand_conflict_names_both_flags(cpu_vllm, capsys):
    with pytest.raises(SystemExit):
        _cli(["--speculative-config", '{"method": "ngram"}', "--speculative", "odb"])
    assert "--speculative" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("spec", [{"method": "odb"}, {"method": "odb", "alp_threshold": 0.7}])
def test_speculative_odb_becomes_the_decoding_section(cpu_vllm, fmt, spec):
    vc = _create(fmt, additional_config={"odb": {"block_length": 16}}, speculative_config=spec)
    assert vc.speculative_config is None  # V2 would refuse a speculator; the canvas sets the slots
    assert vc.num_speculative_tokens == vc.diffusion_config.canvas_length == (251 if fmt == "llada" else 485)
    engine = vc.model_config.hf_config.odb_engine
    assert (engine["alp"], engine["early_stop"], engine["jump"], engine["block_length"]) == (True, True, True, 16)
    assert engine["alp_threshold"] == spec.get("alp_threshold", 0.9)


def test_spec_method_odb_from_cli_builds_the_engine(cpu_vllm):
    args = _cli(["--spec-method", "odb"])
    vc = _create("llada", speculative_config=args.speculative_config, spec_method=args.spec_method)
    assert vc.speculative_config is None and vc.model_config.hf_config.odb_engine["alp"]


@pytest.mark.parametrize("kwargs, name", [
    ({"speculative_config": {"method": "odb", "thresh": 0.8}}, "thresh"),
    ({"speculative_config": {"method": "odb", "threshold": 3}}, "threshold"),
    ({"speculative_config": {"method": "odb", "num_speculative_tokens": 4}}, "num_speculative_tokens"),
    ({"speculative_config": {"method": "odb", "threshold": 0.8},
      "additional_config": {"odb": {"threshold": 0.7}}}, "threshold"),
    ({"speculative_config": {"method": "odb"}, "additional_config": {"odb": {"method": "fast-dllm"}}}, "method"),
    ({"speculative_config": {"method": "odb"}, "spec_tokens": 4}, "spec-tokens"),
])
def test_speculative_odb_errors_name_the_knob(cpu_vllm, kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}") as info:
        _create("llada", **kwargs)
    assert "speculative" in str(info.value)


def test_speculative_odb_refused_for_other_models():
    from vllm_odb.patches.speculative_odb import odb_section

    with pytest.raises(ValueError, match="vllm-odb"):
        odb_section({"method": "odb"}, None, types.SimpleNamespace(architectures=["LlamaForCausalLM"],
                                                                   model_type="llama"))


def test_other_speculative_methods_untouched(cpu_vllm):
    """Without "odb" the original method runs (here: ngram's own validation)."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(TINY["llada"]), speculative_config={"method": "ngram"})
    with pytest.raises(Exception, match="num_speculative_tokens"):
        args.create_speculative_config(types.SimpleNamespace(), types.SimpleNamespace())


# ---------------------------------------------------------------------------------------------
# 11. OpenAI request fields: n, best_of
# ---------------------------------------------------------------------------------------------


def test_validation_refuses_n_above_one(odb_model_config):
    with pytest.raises(ValueError, match=r"\bn\b.*send the request n times"):
        SamplingParams(temperature=0.7, n=2)._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_best_of_is_refused_by_name(odb_model_config, api):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if api == "chat":
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], best_of=2)
        params = req.to_sampling_params(16, {})
    else:
        req = CompletionRequest(model="m", prompt="hi", best_of=2)
        params = req.to_sampling_params(16, None)
    with pytest.raises(ValueError, match=r"\bbest_of\b"):
        params._validate_diffusion(odb_model_config)


def test_best_of_one_is_fine_and_leaves_extra_args_clean(odb_model_config):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    params = CompletionRequest(model="m", prompt="hi", best_of=1, vllm_xargs={"threshold": 0.7}).to_sampling_params(
        16, None)
    params._validate_diffusion(odb_model_config)
    assert params.extra_args == {"threshold": 0.7}


def test_canvas_end_of_a_jump_share_engine_leaves_room_for_the_draft_rows():
    """The last block's query reaches canvas_width - block positions past the canvas."""
    engine = engine_config({"odb": {"block_length": 16, "gen_length": 64, "method": "odb", "ridge_rows": 48}})
    assert canvas_end(_request(100, 200, {"gen_length": 64}), _hf_config("llada", engine), 164) == 100 + 32


@pytest.mark.parametrize("fmt", ["llada", "dream"])
def test_hook_jump_share_engine(cpu_vllm, fmt):
    from vllm.config.compilation import CUDAGraphMode

    vc = _create(fmt, speculative_config={"method": "odb"})
    window = 16 + SHIFT[fmt]
    assert vc.diffusion_config.canvas_length == (251 if fmt == "llada" else 2 * 251 - window)
    assert vc.scheduler_config.max_num_seqs == 251 // window
    assert vc.scheduler_config.max_num_batched_tokens >= vc.scheduler_config.max_num_seqs * 251
    assert not vc.compilation_config.cudagraph_mode.has_full_cudagraphs()
    assert vc.compilation_config.cudagraph_mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.NONE)


@pytest.mark.parametrize("knobs,name", [({"method": "streaming"}, "cache='prefix'"),
                                        ({"method": "dynamic"}, "dcu.*'dynamic-apd'"),
                                        ({"method": "dynamic-dcu"}, "dcu.*'dynamic-apd'")])
def test_reference_only_policies_are_refused_by_name_on_the_engine(knobs, name):
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies import DecodeConfig

    with pytest.raises(ValueError, match=name):
        request_config(DecodeConfig(gen_length=64, block_length=16), knobs)


@pytest.mark.parametrize("knobs,want", [({"method": "odb-streaming"}, (32, True, 0.3)),
                                        ({"suffix_window": 16, "threshold_alpha": 0.3}, (16, False, 0.3))])
def test_suffix_pruning_runs_on_the_engine(knobs, want):
    """Streaming-dLLM's suffix pruning on the engine's dual cache, alone or with jump-share."""
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies import DecodeConfig

    engine = DecodeConfig(gen_length=64, block_length=16, jump=want[1])  # jump-share needs its engine
    cfg = request_config(engine, knobs)
    assert (cfg.suffix_window, cfg.jump, cfg.threshold_alpha) == want and cfg.cache == "dual"


@pytest.mark.parametrize("knobs,want", [({"threshold_alpha": 0.3}, ("threshold", 0.3)),
                                        ({"method": "odb-alp", "threshold_alpha": 0.5}, ("threshold", 0.5)),
                                        ({"method": "dynamic-apd"}, ("adaptive", 0.0))])
def test_dynamic_threshold_and_apd_run_on_the_engine(knobs, want):
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies import DecodeConfig

    cfg = request_config(DecodeConfig(gen_length=64, block_length=16), knobs)
    assert (cfg.rule, cfg.threshold_alpha) == want and cfg.cache == "dual"
