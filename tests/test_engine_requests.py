"""The engine's per-request table (CPU; engine/requests.py): a request's row, knobs and canvas, the
warm-up, resumed and refused ones, and its stop strings as end markers."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_odb.engine.requests import RequestTable  # noqa: E402
from vllm_odb.reference.loader import load_tokenizer  # noqa: E402
from vllm_plugin_common import TINY, _engine  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The per-request table
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
# Stop strings: end markers on the engine too (ALP and early stop read them)
# ---------------------------------------------------------------------------------------------


def _stop_table(tokenizer):
    return RequestTable(4, 128, _engine(), 0, mask_id=MASK, eos_id=EOS, markers=[(EOS,)], device="cpu",
                        tokenizer=tokenizer)


def test_stop_strings_are_the_requests_end_markers():
    """Tokenized with the model's tokenizer as the reference does (no special tokens added), after
    the checkpoint's end ids; each request has its own."""
    tok = load_tokenizer(str(TINY["llada"]))
    table = _stop_table(lambda: tok)
    # " zqx": several tokens with any of the shipped tokenizers (characters, or the worked suite's words)
    a = table.add(0, "a", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20, stop=["+", " zqx"]))
    b = table.add(1, "b", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20))
    c = table.add(2, "c", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20, stop="+"))
    want = tuple(tuple(tok(s, add_special_tokens=False)["input_ids"]) for s in ("+", " zqx"))
    assert a.markers == ((EOS,),) + want and len(want[1]) >= 2
    assert b.markers == ((EOS,),)
    assert c.markers == ((EOS,), want[0])


def test_without_a_tokenizer_stop_strings_end_requests_in_vllm_only(caplog):
    """``skip_tokenizer_init`` (no tokenizer) or one that fails to load: the checkpoint's end ids
    stay the markers, the request is served, and the tokenizer is not asked for again."""
    calls = []
    for load in (lambda: calls.append(1), lambda: calls.append(1) or (_ for _ in ()).throw(OSError("no files"))):
        table = _stop_table(load)
        with caplog.at_level(logging.WARNING, logger="vllm_odb.engine.requests"):
            for slot in range(2):
                q = table.add(slot, f"r{slot}", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20, stop=["x"]))
                assert q.markers == ((EOS,),) and not q.finished
    assert calls == [1, 1]  # once per table
    assert "no tokenizer for stop strings" in caplog.text  # the failing load is logged


def test_warmup_requests_do_not_load_the_tokenizer():
    calls = []
    table = _stop_table(lambda: calls.append(1))
    table.add(0, "_warmup_0", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20, stop=["x"]))
    table.add(1, "b", [1, 2, 3], None, SamplingParams(temperature=0, max_tokens=20))
    assert calls == []
