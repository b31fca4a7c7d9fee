"""``bench server-fuzz``'s request generator (vllm_odb/bench/fuzz.py) on CPU: seeded and pure,
every category drawn, each case well formed as a case; and every case through the front end's
stages that run on CPU, as vLLM 0.26's server runs them: JSON, the request model (pydantic),
``to_sampling_params``, then our validation (patches/diffusion_params.py, inside vLLM's
``generate``: only a ``ValueError`` there is a 400, anything else a 500) and the msgpack encoding
of the request for the engine core. No case may end in a 500 there, and every case labelled
``4xx`` gets a 4xx there (the labels are decided by these stages; rendering and tokenizing the
prompt, which are not run here, only meet ``not-5xx`` cases). The GPU run sends them all to a
real server."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from vllm_odb.bench import fuzz

MODEL = "checkpoints/tiny-llada"


def test_cases_are_seeded_and_pure():
    a = fuzz.fuzz_cases(200, 24, MODEL)
    assert a == fuzz.fuzz_cases(200, 24, MODEL)
    assert a != fuzz.fuzz_cases(200, 25, MODEL)
    assert [c["id"] for c in a] == list(range(200))
    assert [fuzz.payload(c) for c in a] == [fuzz.payload(c) for c in fuzz.fuzz_cases(200, 24, MODEL)]


def test_every_category_is_drawn_evenly():
    cases = fuzz.fuzz_cases(200, 24, MODEL)
    counts = {c: sum(x["category"] == c for x in cases) for c in fuzz.CATEGORIES}
    assert set(counts) == set(fuzz.CATEGORIES) and min(counts.values()) >= 200 // len(fuzz.CATEGORIES)
    assert {x["category"] for x in fuzz.fuzz_cases(len(fuzz.CATEGORIES), 1, MODEL)} == set(fuzz.CATEGORIES)
    assert 0.15 < sum(c["stream"] for c in cases) / len(cases) < 0.5  # some stream (errors come as events)
    assert {c["expect"] for c in cases} == {"4xx", "not-5xx"}


@pytest.mark.parametrize("seed", [24, 7])
def test_every_case_is_one_request(seed):
    for c in fuzz.fuzz_cases(200, seed, MODEL):
        assert c["endpoint"] in (fuzz.COMPLETIONS, fuzz.CHAT)
        assert sum(c[k] is not None for k in ("body", "raw", "raw_hex")) == 1
        assert isinstance(fuzz.payload(c), bytes) and c["note"]
        json.dumps(c)  # the report holds it


def test_misspellings_are_no_knob():
    import random

    names = set(fuzz._knob_names())
    rng = random.Random(0)
    for name in sorted(names):
        for _ in range(20):
            assert fuzz._typo(rng, name, names) not in names


def test_judge():
    four = {"expect": "4xx"}
    either = {"expect": "not-5xx"}
    assert fuzz.judge(four, {"status": 400}) is None
    assert fuzz.judge(four, {"status": 200}) == "expected a 4xx, got 200"
    assert fuzz.judge(either, {"status": 200}) is None
    assert fuzz.judge(either, {"status": 500}) == "server error 500"
    assert fuzz.judge(either, {"status": 0, "timeout": True}) == "no answer within the timeout"
    assert "no HTTP answer" in fuzz.judge(either, {"status": 0})


# ---- the front end's CPU stages ------------------------------------------------------------------
def _hf_config(speculative: bool):
    from vllm_odb.bench.serving import engine_section
    from vllm_odb.engine.knobs import engine_config

    section = {**engine_section(speculative), **({"method": "odb"} if speculative else {})}
    cfg = engine_config({"odb": section})
    return types.SimpleNamespace(odb_engine={f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def front_end(case: dict, hf_config) -> tuple[int, str]:
    """(status, stage) as vLLM 0.26's server would answer the case, up to what runs on CPU
    (rendering the prompt, the model name check and the engine are not run: 0 = passed)."""
    import warnings

    import pydantic
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.v1.serial_utils import MsgpackEncoder

    from vllm_odb.patches.diffusion_params import validate_odb_request

    if case["content_type"] != "application/json":
        return 415, "content type"
    try:
        body = json.loads(fuzz.payload(case))
    except ValueError:
        return 400, "json"
    warnings.simplefilter("ignore", DeprecationWarning)
    cls = CompletionRequest if case["endpoint"] == fuzz.COMPLETIONS else ChatCompletionRequest
    try:  # FastAPI validates the parsed body, whatever its JSON type (a list reached .get(): 500)
        request = pydantic.TypeAdapter(cls).validate_python(body, from_attributes=True)
    except (pydantic.ValidationError, TypeError, OverflowError):  # the latter two: vLLM's app handlers
        return 400, "request model"
    except Exception as e:  # uvicorn: 500, and the connection closed
        return 500, f"request model raised {type(e).__name__}: {e}"
    requested = request.max_tokens if cls is CompletionRequest else request.max_completion_tokens or request.max_tokens
    max_tokens = min(x for x in (500, requested) if x is not None)
    try:
        params = request.to_sampling_params(max_tokens, {})
    except (ValueError, TypeError, OverflowError):  # vLLM's app-level handlers: 400
        return 400, "sampling params"
    try:
        validate_odb_request(params, hf_config)  # inside generate(): only ValueError is a 400
    except ValueError:
        return 400, "our validation"
    except Exception as e:  # EngineGenerateError: 500
        return 500, f"our validation raised {type(e).__name__}: {e}"
    try:
        MsgpackEncoder().encode(params)  # inside generate() too
    except Exception as e:
        return 500, f"encoding for the engine core: {type(e).__name__}: {e}"
    return 0, "passed"


@pytest.mark.parametrize("speculative", [False, True])
def test_no_case_reaches_a_server_error_and_4xx_cases_get_one(speculative):
    """(``min_p`` is ``not-5xx``: vLLM drops it at temperature 0, so greedy requests pass.)"""
    pytest.importorskip("vllm")
    import vllm.plugins

    vllm.plugins.load_general_plugins()  # the request wrappers (best_of) as the server has them
    hf = _hf_config(speculative)
    wrong = []
    for seed in (24, 7, 3):
        for c in fuzz.fuzz_cases(200, seed, MODEL):
            status, stage = front_end(c, hf)
            if status >= 500 or (c["expect"] == "4xx" and not 400 <= status < 500):
                wrong.append((c["category"], c["note"], status, stage))
    assert not wrong, wrong[:10]


def test_the_knob_fixes_the_fuzz_found():
    """What the fuzz cases found in our validation: a list where a method name goes (was a
    TypeError: HTTP 500), an integer msgpack cannot carry to the engine core (was an
    OverflowError there: 500), and JSON true/false, which vLLM's ``vllm_xargs`` turns into 1/0
    (was a 400 for ``"jump": false``, which the README shows)."""
    from vllm_odb.engine.knobs import engine_config, request_config

    engine = engine_config({"odb": {"block_length": 16, "gen_length": 64, "method": "odb", "ridge_rows": 64}})
    with pytest.raises(ValueError, match="method"):
        request_config(engine, {"method": ["odb-alp"]})
    with pytest.raises(ValueError, match="gen_length: an integer out of range"):
        request_config(engine, {"gen_length": 10 ** 30})
    with pytest.raises(ValueError, match="ridge_rows"):
        request_config(engine, {"ridge_rows": [1, 2 ** 64]})
    assert request_config(engine, {"gen_length": 2 ** 62 // 16 * 16}).gen_length == 2 ** 62 // 16 * 16
    assert request_config(engine, {"jump": 0}).jump is False
    assert request_config(engine, {"alp": 1, "early_stop": 0}).alp is True
    with pytest.raises(ValueError, match="jump=2 must be true or false"):
        request_config(engine, {"jump": 2})
    with pytest.raises(ValueError, match="alp=1.0 must be true or false"):
        request_config(engine, {"alp": 1.0})
