"""``bench server-soak``'s pure parts (vllm_odb/bench/soak.py) on CPU: the request plan, the stop
strings picked from an offline answer, the comparison of a stream with its offline answer, the
latency summary, and the conversations of mixed lengths."""

from __future__ import annotations

import random

import pytest

from vllm_odb.bench import soak

LENGTHS = [23, 25, 30, 36, 40, 44, 52, 56, 90, 120, 140, 150]


def test_plan_is_seeded_and_mixed():
    plan = soak.soak_plan(1000, 24, LENGTHS, soak.METHODS_SPECULATIVE)
    assert plan == soak.soak_plan(1000, 24, LENGTHS, soak.METHODS_SPECULATIVE)
    assert plan != soak.soak_plan(1000, 25, LENGTHS, soak.METHODS_SPECULATIVE)
    assert [r["i"] for r in plan] == list(range(1000))
    assert sum(r["abort_after"] > 0 for r in plan) == 250  # exactly a quarter
    assert {r["method"] for r in plan} == {"fast-dllm", "odb-alp", "odb"}
    assert {r["api"] for r in plan} == {"chat", "completions"}
    assert {r["max_tokens"] for r in plan} == set(soak.MAX_TOKENS)
    assert 250 < sum(r["wants_stop"] for r in plan) < 420
    for length in ("short", "medium", "long"):
        assert 320 < sum(r["length"] == length for r in plan) < 350


def test_plan_lengths_follow_the_prompts():
    plan = soak.soak_plan(300, 1, LENGTHS, soak.METHODS_DEFAULT)
    of = {"short": set(), "medium": set(), "long": set()}
    for r in plan:
        of[r["length"]].add(LENGTHS[r["prompt"]])
    assert max(of["short"]) < min(of["medium"]) and max(of["medium"]) < min(of["long"])
    assert "odb" not in {r["method"] for r in plan}  # the default engine has no jump-share canvas


def test_abort_fraction_and_small_plans():
    assert sum(r["abort_after"] > 0 for r in soak.soak_plan(40, 3, LENGTHS, soak.METHODS_DEFAULT, 0.5)) == 20
    plan = soak.soak_plan(5, 3, [30], soak.METHODS_DEFAULT)  # one prompt: every third is it
    assert {r["prompt"] for r in plan} == {0}


def test_stop_strings_occur_in_the_text():
    rng = random.Random(0)
    text = "7+8=15, 4+3+1=8, so 85"
    for _ in range(50):
        stop = soak.pick_stop(text, rng)
        assert stop in text and stop.strip() and len(stop) == 2 and text.find(stop) >= 0
        assert text.rfind(stop) >= len(text) // 2
    assert soak.pick_stop("abc", rng) is None
    assert soak.pick_stop("ab          ", rng) is None  # nothing but blanks in its second half


EXPECTED = {"expected": "so 85", "expected_tokens": 5, "prompt_tokens": 30, "finish_reason": "stop"}
GOOD = {"status": 200, "done": True, "text": "so 85", "finish_reason": "stop",
        "usage": {"prompt_tokens": 30, "completion_tokens": 5}}


@pytest.mark.parametrize("change,problem", [
    ({}, None),
    ({"text": "so 86"}, "text differs"),
    ({"text": "so 8", "finish_reason": "length", "usage": {"prompt_tokens": 30, "completion_tokens": 4}},
     "text differs"),  # another text: its own finish reason and length
    ({"text": "so 8", "finish_reason": None}, ["text differs", "no finish reason or token count"]),
    ({"finish_reason": "length"}, "finish_reason length != stop"),
    ({"usage": {"prompt_tokens": 30, "completion_tokens": 6}}, "completion_tokens 6 != 5"),
    ({"usage": {"prompt_tokens": 31, "completion_tokens": 5}}, "prompt_tokens 31 != 30"),
    ({"done": False}, "stream ended without [DONE]"),
    ({"status": 500, "error": "Internal server error"}, "error 500: Internal server error"),
    ({"timeout": True}, "no answer within the timeout"),
    ({"exception": "ServerDisconnectedError"}, "connection: ServerDisconnectedError"),
    ({"aborted": True, "text": "so", "done": False, "usage": None}, None),
    ({"aborted": True, "text": "sx", "done": False}, "aborted stream is not a prefix of the offline text"),
])
def test_compare(change, problem):
    got = soak.compare(EXPECTED, {**GOOD, **change})
    assert got == ([] if problem is None else problem if isinstance(problem, list) else [problem])


def test_latency_summary():
    done = [{"done": True, "latency": float(i), "ttft": i / 10, "usage": {"completion_tokens": 10}}
            for i in range(1, 101)]
    cut = [{"aborted": True, "latency": 0.1}, {"timeout": True, "latency": 300.0}]
    s = soak.latency_summary(done + cut, 50.0)
    assert s["latency_s"] == {"p50": 50.5, "p99": 99.01, "max": 100.0}
    assert s["first_chunk_s"]["p50"] == 5.05
    assert s["completed_per_s"] == 2.0 and s["output_tokens"] == 1000 and s["output_tokens_per_s"] == 20.0
    assert soak.latency_summary([], 0.0)["latency_s"]["p50"] is None


def test_conversations_mix_lengths():
    convs = soak.suite_conversations(30, 24)
    assert len(convs) == 30
    assert [len(c) for c in convs] == [1, 1, 3] * 10
    assert all(c[-1]["role"] == "user" for c in convs) and convs[2][1]["role"] == "assistant"
    lengths = [soak.conversation_length(c) for c in convs]
    assert min(lengths[2::3]) > max(lengths[0::3]) or sum(lengths[2::3]) > 2 * sum(lengths[0::3])
    assert convs == soak.suite_conversations(30, 24)


def test_request_body():
    r = {"api": "completions", "ids": [1, 2, 3], "max_tokens": 16, "method": "odb", "stop": ["ab"]}
    b = soak.body(r, "m")
    assert b["prompt"] == [1, 2, 3] and b["stream"] and b["stream_options"] == {"include_usage": True}
    assert b["vllm_xargs"] == {"method": "odb"} and b["stop"] == ["ab"] and b["temperature"] == 0.0
    c = soak.body({"api": "chat", "messages": [{"role": "user", "content": "q"}], "max_tokens": 8,
                   "method": "fast-dllm"}, "m")
    assert c["messages"] == [{"role": "user", "content": "q"}] and "stop" not in c and "prompt" not in c
