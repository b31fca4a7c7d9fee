"""One-line errors for bad input (CPU; vllm_odb/errors.py): a checkpoint directory that is not one,
missing, truncated or mis-sized weights, malformed JSON (file:line:col), an empty prompt, a knob
the method ignores. The command lines print ``error: <one line>`` and exit 2; the vLLM path raises
a ``ValueError`` (HTTP 400 for a request, an engine-config error for the checkpoint). Every case
runs on a real copy of checkpoints/tiny-llada, mangled."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_odb.checkpoint import check_weights, load_spec
from vllm_odb.errors import ODBError, cli_error, one_line
from vllm_odb.policies.config import KNOB_ACTS_WHEN, METHODS, DecodeConfig
from vllm_odb.reference.loader import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_LLADA = ROOT / "checkpoints" / "tiny-llada"
WEIGHTS = "model.safetensors"


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A fresh copy of the tiny LLaDA checkpoint to mangle."""
    return Path(shutil.copytree(TINY_LLADA, tmp_path / "ckpt"))


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def _truncate(file: Path, size: int) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:size])


def _shard(path: Path) -> None:
    """Rewrite the checkpoint as two shards plus model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / WEIGHTS))
    names = sorted(tensors)
    half = {"a": names[: len(names) // 2], "b": names[len(names) // 2:]}
    weight_map = {}
    for part, keys in half.items():
        save_file({k: tensors[k] for k in keys}, str(path / f"model-{part}.safetensors"))
        weight_map.update({k: f"model-{part}.safetensors" for k in keys})
    (path / WEIGHTS).unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# Each fault: how to make it from a good copy, and what the one line must name (``{p}`` = the
# checkpoint directory).
CHECKPOINT_FAULTS = {
    "not a directory": (lambda p: (shutil.rmtree(p), p.write_text("x")), "{p}: not a directory"),
    "no such directory": (lambda p: shutil.rmtree(p), "{p}: no such directory"),
    "not a checkpoint": (lambda p: (p / "config.json").unlink(), "{p}: not a checkpoint directory (no config.json)"),
    "malformed config.json": (
        lambda p: (p / "config.json").write_text('{\n  "d_model": 256,\n  "n_heads" 4\n}\n'),
        "{p}/config.json:3:13: malformed JSON"),
    "config.json not an object": (lambda p: (p / "config.json").write_text("[1, 2]"),
                                  "{p}/config.json: expected a JSON object"),
    "config key of the wrong type": (lambda p: _edit_config(p, d_model="256"),
                                     "{p}/config.json: d_model='256' is not an integer"),
    "config key missing": (lambda p: _edit_config(p, mask_token_id=None), "{p}/config.json: missing 'mask_token_id'"),
    "no weights": (lambda p: (p / WEIGHTS).unlink(), "{p}: no weights"),
    "truncated weights": (lambda p: _truncate(p / WEIGHTS, 5_000_000),
                          "{p}/model.safetensors: truncated: 5000000 bytes"),
    "truncated header": (lambda p: _truncate(p / WEIGHTS, 100),
                         "{p}/model.safetensors: truncated or not a safetensors file"),
    "weights not safetensors": (lambda p: (p / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
                                "{p}/model.safetensors: not a safetensors file"),
    "config sizes differ from the weights": (
        lambda p: _edit_config(p, d_model=128),
        ("{p}/model.safetensors: tensor model.transformer.blocks.0.attn_norm.weight has shape [256], "
         "{p}/config.json implies [128] (and 74 more): the config's sizes do not match the weights")),
    "more layers in the config": (lambda p: _edit_config(p, n_layers=9),
                                  "{p}: missing tensor model.transformer.blocks.8.attn_norm.weight (and 8 more)"),
    "fewer layers in the config": (lambda p: _edit_config(p, n_layers=7),
                                   "{p}/model.safetensors: unexpected tensor model.transformer.blocks.7."),
    "index lists a missing shard": (lambda p: (_shard(p), (p / "model-b.safetensors").unlink()),
                                    "{p}/model-b.safetensors: missing (listed in {p}/model.safetensors.index.json)"),
    "malformed index": (lambda p: (_shard(p), (p / "model.safetensors.index.json").write_text('{"weight_map": }')),
                        "{p}/model.safetensors.index.json:1:16: malformed JSON"),
    "no tokenizer": (lambda p: (p / "tokenizer.json").unlink(), "{p}: no tokenizer"),
    "malformed tokenizer.json": (lambda p: (p / "tokenizer.json").write_text("{"), "{p}/tokenizer.json:1:2: malformed JSON"),
    "malformed generation_config.json": (lambda p: (p / "generation_config.json").write_text("{,}"),
                                         "{p}/generation_config.json:1:2: malformed JSON"),
}


def _fault(ckpt: Path, name: str) -> str:
    make, message = CHECKPOINT_FAULTS[name]
    make(ckpt)
    return message.format(p=ckpt)


# ---------------------------------------------------------------------------------------------
# The loader: one line naming the file
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_loader_fault_is_one_line_naming_the_file(ckpt, fault):
    message = _fault(ckpt, fault)
    with pytest.raises(ODBError) as e:
        load_checkpoint(str(ckpt))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_shards_of_a_good_checkpoint_pass(ckpt):
    _shard(ckpt)
    check_weights(str(ckpt), load_spec(str(ckpt)))


def test_unsupported_config_feature_names_the_file(ckpt):
    _edit_config(ckpt, alibi=True)
    with pytest.raises(NotImplementedError, match=rf"^{ckpt}/config.json: LLaDA alibi=true is not supported$"):
        load_checkpoint(str(ckpt))


def test_weights_longer_than_their_header_are_refused(ckpt):
    with open(ckpt / WEIGHTS, "ab") as f:
        f.write(b"junk")  # safetensors refuses these too ("file not fully covered")
    with pytest.raises(ODBError, match="longer than its header describes"):
        load_checkpoint(str(ckpt))


def test_one_line_and_cli_error(capsys):
    assert one_line(ValueError("a\n  b  c \n\n")) == "a b  c"
    assert one_line(KeyError()) == "KeyError"
    assert cli_error(ODBError("x.json:1:2: bad\nmore")) == 2
    assert capsys.readouterr().err == "error: x.json:1:2: bad more\n"


# ---------------------------------------------------------------------------------------------
# The command lines: error: <one line>, exit 2
# ---------------------------------------------------------------------------------------------


def _generate(argv, capsys):
    from vllm_odb.generate import main

    rc = main(argv)
    return rc, capsys.readouterr()


def _quality(argv, capsys):
    from vllm_odb.bench.__main__ import main

    rc = main(["quality", *argv])
    return rc, capsys.readouterr()


CLIS = {"generate": (_generate, []), "bench quality": (_quality, ["--method", "odb", "--limit", "1"])}


def _assert_one_line_error(rc, out, *names):
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert out.out == ""


@pytest.mark.parametrize("cli", sorted(CLIS))
@pytest.mark.parametrize("fault", ["not a checkpoint", "malformed config.json", "no weights", "truncated weights",
                                   "config sizes differ from the weights", "no such directory"])
def test_cli_checkpoint_fault_exits_2_with_one_line(ckpt, capsys, cli, fault):
    message = _fault(ckpt, fault)
    run, extra = CLIS[cli]
    rc, out = run(["--model", str(ckpt), *extra], capsys)
    _assert_one_line_error(rc, out, message)


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_unsupported_feature_exits_2(ckpt, capsys, cli):
    _edit_config(ckpt, scale_logits=True)
    run, extra = CLIS[cli]
    _assert_one_line_error(*run(["--model", str(ckpt), *extra], capsys), f"{ckpt}/config.json", "scale_logits")


@pytest.mark.parametrize("command", [["dynamics", "--methods", "fast-dllm", "--limit", "1"],
                                     ["traces", "--methods", "fast-dllm", "--engines", "reference", "--out"]])
def test_other_bench_commands_report_a_bad_checkpoint_in_one_line(ckpt, tmp_path, capsys, command):
    from vllm_odb.bench.__main__ import main

    message = _fault(ckpt, "truncated weights")
    out = [str(tmp_path / "traces.json")] if command[-1] == "--out" else []
    rc = main([command[0], "--model", str(ckpt), *command[1:], *out])
    _assert_one_line_error(rc, capsys.readouterr(), message)


@pytest.mark.parametrize("prompts, name", [([""], "prompt 1 of 1"), (["hi", "   "], "prompt 2 of 2 ('   ')")])
def test_generate_refuses_an_empty_prompt_by_number(capsys, prompts, name):
    _assert_one_line_error(*_generate(["--model", str(TINY_LLADA), *prompts], capsys), name, "empty")


def test_generate_refuses_an_empty_stop_string(capsys):
    _assert_one_line_error(*_generate(["--model", str(TINY_LLADA), "--stop", "", "hi"], capsys), "--stop")


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_cli_refuses_a_knob_the_method_ignores(capsys, cli):
    run, _ = CLIS[cli]
    argv = ["--model", str(TINY_LLADA), "--method", "vanilla", "--threshold", "0.5"]
    _assert_one_line_error(*run(argv + (["--limit", "1"] if cli != "generate" else []), capsys),
                           "threshold=0.5", "method 'vanilla'", "rule='quota'")


def test_quality_refuses_ridge_rows_without_jump(capsys):
    argv = ["--model", str(TINY_LLADA), "--method", "fast-dllm", "--ridge-rows", "64", "--limit", "1"]
    _assert_one_line_error(*_quality(argv, capsys), "ridge_rows=64", "jump=false")


# ---------------------------------------------------------------------------------------------
# Knobs a method ignores
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, knobs, name", [
    ("vanilla", {"threshold": 0.5}, "threshold"),
    ("fast-dllm", {"factor": 2.0}, "factor"),
    ("fast-dllm", {"gen_length": 32, "schedule": "dream"}, "schedule"),
    ("fast-dllm", {"apd_min": 0.3}, "apd_min"),
    ("fast-dllm", {"alp_threshold": 0.5}, "alp_threshold"),
    ("odb-alp", {"ridge_rows": 64}, "ridge_rows"),
    ("odb-jump", {"alp_min_length": 32}, "alp_min_length"),
    ("fast-dllm", {"dcu_window": 8}, "dcu_window"),
    ("dynamic", {"suffix_window": 0}, "suffix_window"),
])
def test_for_method_refuses_a_knob_the_method_ignores(method, knobs, name):
    with pytest.raises(ValueError, match=rf"^{name}=.* does nothing with method '{method}'"):
        DecodeConfig.for_method(method, **{"gen_length": 64, **knobs})


@pytest.mark.parametrize("method, knobs, name", [("vanilla", {"threshold_alpha": 0.3}, "threshold_alpha"),
                                                 ("fast-dllm", {"steps": 64}, "steps")])
def test_idle_knobs_refused_by_the_config_itself(method, knobs, name):
    """These two were refused before the method check (DecodeConfig.__post_init__), by name."""
    with pytest.raises(ValueError, match=rf"^{name}=.* applies to rule="):
        DecodeConfig.for_method(method, gen_length=64, **knobs)


@pytest.mark.parametrize("method, knobs", [
    ("vanilla", {"steps": 64, "schedule": "linear"}),
    ("fast-dllm", {"threshold": 0.8, "threshold_alpha": 0.3}),
    ("fast-dllm", {"rule": "factor", "factor": 2.0}),
    ("dynamic-apd", {"threshold": 0.95, "apd_min": 0.6}),
    ("odb", {"alp_threshold": 0.8, "ridge_rows": 64, "max_draft_positions": 4}),
    ("dynamic-dcu", {"dcu_window": 8, "threshold": 0.8}),
    ("streaming", {"suffix_window": 64}),
    ("vanilla", {"threshold": None}),  # None = not set (the command lines' unset flags)
])
def test_for_method_accepts_knobs_that_act(method, knobs):
    DecodeConfig.for_method(method, gen_length=64, **knobs)


def test_every_conditional_knob_is_a_field_and_every_method_builds():
    fields = set(DecodeConfig.__dataclass_fields__)
    assert set(KNOB_ACTS_WHEN) <= fields
    assert all(setting in fields for setting, _ in KNOB_ACTS_WHEN.values())
    for method in METHODS:
        DecodeConfig.for_method(method)
