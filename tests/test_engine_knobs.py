"""Decoding knobs on the engine (CPU; engine/knobs.py): the engine section, a request's overrides,
the canvas a request takes (and the scheduler patch allocates), and the policies the engine runs
or refuses by name."""

from __future__ import annotations

import re
import types

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_odb.engine.knobs import canvas_width, engine_config, live_gen_length, request_config  # noqa: E402
from vllm_odb.patches.scheduler_lookahead import canvas_end  # noqa: E402
from vllm_plugin_common import _engine, _hf_config  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Engine and request knobs
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
    assert canvas_width(cfg, 1) == (max(width, 17) if cfg.jump else 17)  # Dream's layouts keep to the budget too


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


@pytest.mark.parametrize("extra, name, setting", [
    ({"factor": 2.0}, "factor", "rule='threshold'"),
    ({"apd_alpha": 0.1}, "apd_alpha", "rule='threshold'"),
    ({"alp_threshold": 0.7}, "alp_threshold", "alp=false"),
    ({"method": "fast-dllm", "alp_min_length": 32}, "alp_min_length", "method 'fast-dllm' (alp=false)"),
    ({"ridge_rows": 64}, "ridge_rows", "jump=false"),
    ({"rule": "factor", "threshold": 0.7}, "threshold", "rule='factor'"),
    ({"dcu_window": 8}, "dcu_window", "dcu=false"),
])
def test_request_knob_its_config_ignores_is_refused(extra, name, setting):
    with pytest.raises(ValueError, match=rf"^extra_args: {name}=.* does nothing with {re.escape(setting)}"):
        request_config(ENGINE, extra, 0.0, None)


def test_request_may_turn_jump_off_and_keep_the_engine_draft_knobs():
    """The engine's ridge_rows are defaults, not the request's: turning jump off is no idle knob."""
    assert not request_config(JUMP_ENGINE, {"jump": False}, 0.0, None).jump
    with pytest.raises(ValueError, match="ridge_rows=64 does nothing with method 'fast-dllm'"):
        request_config(JUMP_ENGINE, {"method": "fast-dllm", "ridge_rows": 64}, 0.0, None)


def test_engine_section_knobs_are_defaults_not_checked_as_idle():
    """The engine section serves every request, which may pick another rule: factor stays."""
    engine = engine_config({"odb": {"factor": 2.0, "ridge_rows": 64}})
    assert (engine.rule, engine.factor, engine.ridge_rows) == ("threshold", 2.0, 64)
    assert request_config(engine, {"rule": "factor"}, 0.0, None).factor == 2.0


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
# The scheduler patch's canvas end (a request's canvas)
# ---------------------------------------------------------------------------------------------


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


def _request(prompt_len, max_tokens, extra_args=None):
    return types.SimpleNamespace(num_prompt_tokens=prompt_len, sampling_params=SamplingParams(
        temperature=0, max_tokens=max_tokens, extra_args=extra_args))


def test_canvas_end_of_a_jump_share_engine_leaves_room_for_the_draft_rows():
    """The last block's query reaches canvas_width - block positions past the canvas."""
    engine = engine_config({"odb": {"block_length": 16, "gen_length": 64, "method": "odb", "ridge_rows": 48}})
    assert canvas_end(_request(100, 200, {"gen_length": 64}), _hf_config("llada", engine), 164) == 100 + 32

# ---------------------------------------------------------------------------------------------
# The policies the engine runs, and those it refuses by name
# ---------------------------------------------------------------------------------------------

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
