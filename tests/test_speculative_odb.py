""""odb" as a speculative method (CPU; patches/speculative_odb.py): ``--speculative odb`` and its
spellings select ODB as the decoding section; other methods are untouched."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("vllm")


from vllm_plugin_common import TINY, _create, cpu_vllm, plugins_loaded  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# "odb" as a speculative method (patches/speculative_odb.py)
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
def test_cli_selects_odb(cpu_vllm, argv, spec, method):  # noqa: F811 (the fixture)
    args = _cli(argv)
    assert (args.speculative_config, args.spec_method) == (spec, method)


def test_cli_shorthand_conflict_names_both_flags(cpu_vllm, capsys):  # noqa: F811 (the fixture)
    with pytest.raises(SystemExit):
        _cli(["--speculative-config", '{"method": "ngram"}', "--speculative", "odb"])
    assert "--speculative" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["llada", "dream"])
@pytest.mark.parametrize("spec", [{"method": "odb"}, {"method": "odb", "alp_threshold": 0.7}])
def test_speculative_odb_becomes_the_decoding_section(cpu_vllm, fmt, spec):  # noqa: F811 (the fixture)
    vc = _create(fmt, additional_config={"odb": {"block_length": 16}}, speculative_config=spec)
    assert vc.speculative_config is None  # V2 would refuse a speculator; the canvas sets the slots
    assert vc.num_speculative_tokens == vc.diffusion_config.canvas_length == 251  # ridge_rows, Dream's too
    engine = vc.model_config.hf_config.odb_engine
    assert (engine["alp"], engine["early_stop"], engine["jump"], engine["block_length"]) == (True, True, True, 16)
    assert engine["alp_threshold"] == spec.get("alp_threshold", 0.9)


def test_spec_method_odb_from_cli_builds_the_engine(cpu_vllm):  # noqa: F811 (the fixture)
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
def test_speculative_odb_errors_name_the_knob(cpu_vllm, kwargs, name):  # noqa: F811 (the fixture)
    with pytest.raises(ValueError, match=rf"{name}") as info:
        _create("llada", **kwargs)
    assert "speculative" in str(info.value)


def test_speculative_odb_refused_for_other_models():
    from vllm_odb.patches.speculative_odb import odb_section

    with pytest.raises(ValueError, match="vllm-odb"):
        odb_section({"method": "odb"}, None, types.SimpleNamespace(architectures=["LlamaForCausalLM"],
                                                                   model_type="llama"))


def test_other_speculative_methods_untouched(cpu_vllm):  # noqa: F811 (the fixture)
    """Without "odb" the original method runs (here: ngram's own validation)."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(TINY["llada"]), speculative_config={"method": "ngram"})
    with pytest.raises(Exception, match="num_speculative_tokens"):
        args.create_speculative_config(types.SimpleNamespace(), types.SimpleNamespace())
