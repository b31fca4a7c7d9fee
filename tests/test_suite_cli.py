"""The synthetic suite, the tiny formats' tokenizers, the command lines and the plugin entry point."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vllm_odb.tiny.formats import FORMATS, build_tokenizer
from vllm_odb.tiny.suite import LONGEST_ANSWER, TASKS, make_suite, score

from shipped import SUITE, WORKED

ROOT = Path(__file__).resolve().parents[1]


def test_suite_is_seeded_balanced_and_bounded():
    a, b, c = make_suite(0, 200), make_suite(0, 200), make_suite(1, 200)
    assert a == b and a != c
    assert {e.task for e in a} == set(TASKS)
    assert max(len(e.answer) for e in make_suite(0, 5000)) == LONGEST_ANSWER
    assert len({len(e.answer) for e in a}) > 5  # answers of varied lengths


def test_suite_answers_are_right():
    for e in make_suite(2, 300):
        if e.task == "add":
            a, b = map(int, e.prompt.split()[2].rstrip("?").split("+"))
            assert e.answer.endswith(f"so {a + b}")
        elif e.task == "sort":
            letters = e.prompt.split(": ")[1].split()
            assert e.answer == " ".join(sorted(letters))
        elif e.task == "reverse":
            assert e.answer == e.prompt.split()[-1].rstrip(".")[::-1]
        elif e.task == "count":
            words = e.prompt.split()
            assert e.answer == str(words[-1].rstrip("?").count(words[4]))


def test_unknown_task_and_scoring():
    with pytest.raises(ValueError, match="unknown task"):
        make_suite(0, 3, ("add", "poetry"))
    assert score(" 42 \n", "42") and not score("42.", "42")


@pytest.mark.parametrize("suite", ["basic", "worked"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tokenizer_round_trip_and_templates(fmt, suite):
    tok = build_tokenizer(fmt, suite)
    text = "What is 47+38? Show the column sums."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # lossless
    if suite == "basic":
        assert len(ids) == len(text)  # character level
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    if fmt == "llada":
        assert rendered == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + text +
                            "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    else:
        assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + text +
                            "<|im_end|>\n<|im_start|>assistant\n")
    specials = FORMATS[fmt][0]
    for name in [specials["mask"], specials["eos"], *specials["extra"]]:
        assert tok(name, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(name)]


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _in_process(main, argv, capsys):
    """A command's exit status and stderr, run in this process: its error paths need no fresh
    interpreter (a subprocess costs seconds of imports; the success paths keep theirs)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_quality_command_json_and_errors(capsys):
    from vllm_odb.bench.__main__ import main

    r = _run("vllm_odb.bench", "quality", "--model", "checkpoints/tiny-dream", "--method", "odb", "--engine",
             "reference", "--limit", "5", "--seed", "4", "--gen-length", "64", "--block-length", "32", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "nfe", "generated_tokens", "wall_s", "per_task", "refresh_tokens", "predicted_length",
                "actual_length", "drafted_per_forward", "query_rows_per_forward"):
        assert key in result
    assert "prompt" in r.stderr  # the progress bar
    model = str(ROOT / "checkpoints" / "tiny-dream")
    code, err = _in_process(main, ["quality", "--model", model, "--method", "nope"], capsys)
    assert code == 2 and "fast-dllm" in err and "vanilla" in err
    code, err = _in_process(main, ["quality", "--model", model, "--method", "vanilla", "--engine", "x"], capsys)
    assert code == 2 and "reference" in err
    code, err = _in_process(main, ["quality", "--model", model, "--method", "fast-dllm", "--gen-length", "100",
                                   "--block-length", "32"], capsys)
    assert code == 2 and "gen_length=100" in err and "Traceback" not in err


def test_generate_command(capsys):
    from vllm_odb.generate import main

    question = SUITE.SHOWCASE[-1]  # the basic suite's "Reverse the word planet."
    r = _run("vllm_odb.generate", "--model", "checkpoints/tiny-llada", question)
    assert r.returncode == 0, r.stderr
    prompt, answer, figures, blank, total = r.stdout.splitlines()
    assert (prompt, blank) == (f"> {question}", "") and answer
    n = r"\d+" if WORKED else "6"  # the basic checkpoint answers "tenalp", 6 tokens
    assert WORKED or answer == "tenalp"
    assert re.fullmatch(rf"  tokens {n} · forwards \d+ · [\d.]+ tok/forward · \d+ tok/s · method odb", figures), figures
    assert re.fullmatch(rf"total: 1 prompt in one batch · tokens {n} · forwards \d+ · [\d.]+ s · \d+ tok/s · "
                        r"method odb on cpu", total), total
    code, err = _in_process(main, ["--model", str(ROOT / "checkpoints" / "tiny-llada"), "--threshold", "1.5", "hi"],
                            capsys)
    assert code == 2 and err.splitlines() == ["error: threshold=1.5 must be in (0, 1]"]  # one line, no traceback


def test_generate_json_is_one_object_per_prompt(capsys):
    from vllm_odb.generate import main

    argv = ["--model", str(ROOT / "checkpoints" / "tiny-llada"), "--json", "--gen-length", "32"]
    questions = [SUITE.SHOWCASE[-1], SUITE.SHOWCASE[1]]
    assert main([*argv, *questions]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt"], r["method"]) for r in rows] == [(q, "odb") for q in questions]
    assert all(r["text"] and r["tokens"] > 0 for r in rows)
    if not WORKED:
        assert [(r["text"], r["tokens"]) for r in rows] == [("tenalp", 6), ("a d m q", 7)]
    for r in rows:
        assert {"nfe", "canvas_length", "drafted_accepted", "wall_s"} <= set(r)


def test_plugin_entry_point_declared_and_idempotent():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["vllm.general_plugins"] == {"odb": "vllm_odb:register"}
    assert "vllm==0.26.0" in meta["project"]["dependencies"]
    import vllm_odb

    vllm_odb.register()
    vllm_odb.register()  # idempotent
    assert vllm_odb._registered
