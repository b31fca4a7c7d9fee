"""``python -m vllm_odb.bench server-fuzz``: malformed requests against a loopback ``vllm serve``
of a tiny checkpoint (needs a GPU, or ``--url`` of a running server).

    python -m vllm_odb.bench server-fuzz --model checkpoints/tiny-llada --n 200 --out fuzz.json

``fuzz_cases(n, seed, model)`` (pure, seeded; tests/test_bench_fuzz.py) draws ``n`` requests
round-robin over ``CATEGORIES``: bad JSON, wrong types, out-of-range values, unknown and misspelled
knobs, huge ``max_tokens``, odd unicode, wrong chat roles, and parameters the diffusion engine
refuses; about a third stream. Each case says what it must get: ``4xx`` (it is malformed), or
``not-5xx`` (vLLM may accept it: a prompt of odd unicode is a prompt). Then:

1. a good request; its text is kept;
2. every case, a few at a time (``--concurrency``), each with a timeout: an answer is its HTTP
   status, or for a 200 stream the code of an error event in it. A 5xx, a timeout, or a ``4xx``
   case answered otherwise is a failure;
3. the server must still be healthy, idle (no request running or waiting), and answer the good
   request again with the same text.

Writes a JSON report (``--out``: summary, every case with its answer) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import time

from vllm_odb.bench import serving

CATEGORIES = ("bad_json", "wrong_type", "out_of_range", "unknown_knob", "misspelled_knob", "huge_max_tokens",
              "odd_unicode", "wrong_role", "refused_param")
GOOD_PROMPT = "Sort these letters: c b a"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def _knob_names() -> list[str]:
    from vllm_odb.policies.config import DecodeConfig

    return sorted(f.name for f in dataclasses.fields(DecodeConfig)) + ["method"]


def _typo(rng: random.Random, name: str, taken: set[str]) -> str:
    """A misspelling of ``name`` that is no knob."""
    for _ in range(50):
        i = rng.randrange(len(name))
        edit = rng.choice(("swap", "drop", "double", "case", "space", "dash", "extra"))
        if edit == "swap" and i + 1 < len(name):
            t = name[:i] + name[i + 1] + name[i] + name[i + 2:]
        elif edit == "drop":
            t = name[:i] + name[i + 1:]
        elif edit == "double":
            t = name[:i] + name[i] + name[i:]
        elif edit == "case":
            t = name[:i] + name[i].swapcase() + name[i + 1:]
        elif edit == "space":
            t = name + " "
        elif edit == "dash":
            t = name.replace("_", "-") if "_" in name else name + "-"
        else:
            t = name[:i] + rng.choice("aeiosx") + name[i:]
        if t and t not in taken:
            return t
    return name + "_x"


# ---- one case per category ------------------------------------------------------------------------
def _base(rng: random.Random, model: str, chat: bool, stream: bool) -> dict:
    body = {"model": model, "max_tokens": 16, "temperature": 0.0, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": GOOD_PROMPT}]
    else:
        body["prompt"] = GOOD_PROMPT
    return body


def _bad_json(rng, model):
    good = json.dumps({"model": model, "prompt": GOOD_PROMPT, "max_tokens": 16})
    raw = rng.choice([
        ("truncated", good[: rng.randrange(1, len(good) - 1)], "4xx"),
        ("trailing comma", good[:-1] + ",}", "4xx"),
        ("single quotes", good.replace('"', "'"), "4xx"),
        ("an array", json.dumps([model, GOOD_PROMPT]), "4xx"),
        ("a string", json.dumps(GOOD_PROMPT), "4xx"),
        ("null", "null", "4xx"),
        ("empty body", "", "4xx"),
        ("a number", "42", "4xx"),
        ("unquoted key", good.replace('"model"', "model"), "4xx"),
        ("NaN temperature", good[:-1] + ', "temperature": NaN}', "not-5xx"),
        ("Infinity threshold", good[:-1] + ', "vllm_xargs": {"threshold": Infinity}}', "4xx"),
        ("duplicate keys", good[:-1] + ', "max_tokens": "x"}', "4xx"),
        ("nested 64 deep", '{"model": "%s", "prompt": %s1%s}' % (model, "[" * 64, "]" * 64), "4xx"),
    ])
    note, text, expect = raw
    case = {"endpoint": COMPLETIONS, "raw": text, "expect": expect, "note": note}
    if rng.random() < 0.2:
        case["raw_hex"] = (text.encode() + b"\xff\xfe\xc3\x28").hex()  # invalid UTF-8 after it
        case["raw"], case["note"], case["expect"] = None, note + " + invalid UTF-8", "4xx"
    elif rng.random() < 0.2:
        case["content_type"] = "text/plain"
        case["raw"], case["note"], case["expect"] = good, "JSON sent as text/plain", "not-5xx"
    return case


def _wrong_type(rng, model):
    chat = rng.random() < 0.3
    field, value, expect = rng.choice([
        ("prompt", {"text": GOOD_PROMPT}, "4xx"), ("prompt", 12.5, "4xx"), ("prompt", [1.5, 2], "4xx"),
        ("max_tokens", "many", "4xx"), ("max_tokens", [16], "4xx"), ("max_tokens", 16.5, "4xx"),
        ("temperature", "hot", "4xx"), ("temperature", [0.0], "4xx"), ("temperature", {"v": 0}, "4xx"),
        ("stream", "maybe", "4xx"), ("stop", 5, "4xx"), ("stop", {"s": "x"}, "4xx"), ("n", "two", "4xx"),
        ("model", 123, "4xx"), ("model", None, "not-5xx"), ("top_p", "all", "4xx"),
        ("vllm_xargs", "threshold=0.5", "4xx"), ("vllm_xargs", [1, 2], "4xx"),
        ("vllm_xargs", {"threshold": {"x": 1}}, "4xx"), ("vllm_xargs", {"threshold": "0.5"}, "4xx"),
        ("vllm_xargs", {"threshold": [0.5]}, "4xx"), ("vllm_xargs", {"gen_length": 64.5}, "4xx"),
        ("vllm_xargs", {"gen_length": "64"}, "4xx"), ("vllm_xargs", {"method": ["odb-alp"]}, "4xx"),
        ("vllm_xargs", {"method": 1}, "4xx"), ("vllm_xargs", {"alp": "yes"}, "4xx"),
        ("vllm_xargs", {"early_stop": 2}, "4xx"), ("vllm_xargs", {"confidence": 0}, "4xx"),
        ("vllm_xargs", {"rule": ["threshold"]}, "4xx"), ("vllm_xargs", {"suffix_window": "16"}, "4xx"),
    ])
    if chat and field == "prompt":
        field, value = "messages", rng.choice([GOOD_PROMPT, {"role": "user"}, [GOOD_PROMPT], 7])
    body = _base(rng, model, chat, rng.random() < 0.35)
    body[field] = value
    return {"endpoint": CHAT if chat else COMPLETIONS, "body": body, "expect": expect,
            "note": f"{field}={json.dumps(value)[:60]}"}


def _out_of_range(rng, model):
    field, value, expect = rng.choice([
        ("temperature", -1.0, "4xx"), ("temperature", 1e9, "not-5xx"), ("top_p", 1.5, "4xx"),
        ("top_p", 0.0, "4xx"), ("top_k", -5, "4xx"), ("max_tokens", 0, "4xx"), ("max_tokens", -3, "4xx"),
        ("n", 0, "4xx"), ("presence_penalty", 10.0, "4xx"), ("frequency_penalty", -5.0, "4xx"),
        ("repetition_penalty", 0.0, "4xx"),
        ("vllm_xargs", {"threshold": 1.5}, "4xx"), ("vllm_xargs", {"threshold": 0}, "4xx"),
        ("vllm_xargs", {"threshold": -0.1}, "4xx"), ("vllm_xargs", {"alp_threshold": 0}, "4xx"),
        ("vllm_xargs", {"threshold_alpha": 2}, "4xx"), ("vllm_xargs", {"gen_length": 40}, "4xx"),
        ("vllm_xargs", {"gen_length": 0}, "4xx"), ("vllm_xargs", {"gen_length": -16}, "4xx"),
        ("vllm_xargs", {"ridge_rows": 0}, "4xx"), ("vllm_xargs", {"max_draft_positions": -1}, "4xx"),
        ("vllm_xargs", {"suffix_window": -5}, "4xx"), ("vllm_xargs", {"apd_min": 0}, "4xx"),
        ("vllm_xargs", {"apd_alpha": -1}, "4xx"), ("vllm_xargs", {"factor": 0}, "4xx"),
        ("vllm_xargs", {"gen_length": 10 ** 30}, "4xx"), ("vllm_xargs", {"ridge_rows": 2 ** 70}, "4xx"),
        ("vllm_xargs", {"block_length": 10 ** 25}, "4xx"), ("vllm_xargs", {"alp_min_length": -(10 ** 20)}, "4xx"),
        ("vllm_xargs", {"gen_length": 2 ** 62}, "not-5xx"), ("vllm_xargs", {"alp_min_length": 10 ** 9}, "not-5xx"),
    ])
    body = _base(rng, model, rng.random() < 0.3, rng.random() < 0.35)
    body[field] = value
    return {"endpoint": CHAT if "messages" in body else COMPLETIONS, "body": body, "expect": expect,
            "note": f"{field}={json.dumps(value)[:60]}"}


def _unknown_knob(rng, model):
    name, value, expect, top = rng.choice([
        ("foo", 1, "4xx", False), ("thresh", 0.5, "4xx", False), ("gen", 64, "4xx", False), ("", 1, "4xx", False),
        ("x" * 300, 1, "4xx", False), ("__class__", 1, "4xx", False), ("debug_fault", "nan", "4xx", False),
        ("steps_per_block", 4, "4xx", False), ("kv_cache", "dual", "4xx", False), ("odb", 1, "4xx", False),
        ("frobnicate", True, "not-5xx", True), ("thresholdd", 0.5, "not-5xx", True),
    ])
    body = _base(rng, model, rng.random() < 0.3, rng.random() < 0.35)
    if top:  # an unknown top-level field: vLLM's request models allow extras (a warning), not ours
        body[name] = value
    else:
        body["vllm_xargs"] = {name: value}
    return {"endpoint": CHAT if "messages" in body else COMPLETIONS, "body": body, "expect": expect,
            "note": f"{'field' if top else 'knob'} {name[:40]!r}"}


def _misspelled_knob(rng, model):
    names = _knob_names()
    body = _base(rng, model, rng.random() < 0.3, rng.random() < 0.35)
    if rng.random() < 0.3:
        value = rng.choice(["fast_dllm", "Fast-dLLM", "odb-alp ", "odbalp", "fastdllm", "odb_alp", "ODB", "odb-jmp"])
        body["vllm_xargs"] = {"method": value}
        note = f"method {value!r}"
    else:
        name = rng.choice(["threshold", "gen_length", "block_length", "alp", "alp_threshold", "early_stop", "jump",
                           "method", "ridge_rows", "threshold_alpha", "suffix_window", "confidence"])
        value = {"threshold": 0.8, "gen_length": 64, "block_length": 16, "alp_threshold": 0.9,
                 "ridge_rows": 64, "threshold_alpha": 0.3, "suffix_window": 16, "confidence": "prob",
                 "method": "odb-alp"}.get(name, 1)
        typo = _typo(rng, name, set(names))
        body["vllm_xargs"] = {typo: value}
        note = f"knob {typo!r} for {name!r}"
    return {"endpoint": CHAT if "messages" in body else COMPLETIONS, "body": body, "expect": "4xx", "note": note}


def _huge_max_tokens(rng, model):
    chat = rng.random() < 0.3
    value = rng.choice([10 ** 6, 2 ** 31, 2 ** 31 - 1, 2 ** 63 - 1, 10 ** 30, 1e18])
    body = _base(rng, model, chat, rng.random() < 0.35)
    body["max_completion_tokens" if chat and rng.random() < 0.5 else "max_tokens"] = value
    return {"endpoint": CHAT if chat else COMPLETIONS, "body": body, "expect": "not-5xx",
            "note": f"max_tokens {value}"}


_ODD = ["\u202eRTL override\u202c", "nul\u0000byte", "emoji \U0001F600\U0001F9EA", "e\u0301\u0301\u0301combining",
        "zero\u200bwidth\u200djoin", "\ufeffBOM", "\u65e5\u672c\u8a9e", "\U0010FFFF plane 16", "\ud800 lone surrogate",
        "tab\tnew\nline\r", "\u0085\u2028\u2029 separators", "\x7f\x1b[31m escape"]


def _odd_unicode(rng, model):
    chat = rng.random() < 0.35
    body = _base(rng, model, chat, rng.random() < 0.35)
    where = rng.choice(["prompt", "prompt", "stop", "knob", "value", "long"])
    odd = rng.choice(_ODD)
    expect = "not-5xx"
    if where == "prompt":
        text = odd + " " + GOOD_PROMPT
    elif where == "long":
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x7f), rng.randrange(0xa0, 0xd7ff),
                                       rng.randrange(0xe000, 0x10ffff)])) for _ in range(rng.choice([200, 3000])))
    else:
        text = GOOD_PROMPT
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if where == "stop":
        body["stop"] = [odd]
    elif where == "knob":
        body["vllm_xargs"] = {"threshold" + odd[:3]: 0.9}
        expect = "4xx"
    elif where == "value":
        body["vllm_xargs"] = {"method": "odb-alp" + odd[:2]}
        expect = "4xx"
    return {"endpoint": CHAT if chat else COMPLETIONS, "body": body, "expect": expect,
            "note": f"{where}: {odd[:12]!r}"}


def _wrong_role(rng, model):
    messages, expect, note = rng.choice([
        ([{"role": "robot", "content": GOOD_PROMPT}], "not-5xx", "role robot"),
        ([{"role": "", "content": GOOD_PROMPT}], "not-5xx", "empty role"),
        ([{"role": None, "content": GOOD_PROMPT}], "4xx", "role null"),
        ([{"role": 5, "content": GOOD_PROMPT}], "4xx", "role 5"),
        ([{"content": GOOD_PROMPT}], "4xx", "no role"),
        ([{"role": "USER", "content": GOOD_PROMPT}], "not-5xx", "role USER"),
        ([{"role": "system", "content": "only a system message"}], "not-5xx", "system only"),
        ([{"role": "tool", "content": "42"}], "not-5xx", "tool without tool_call_id"),
        ([{"role": "function", "content": "42"}], "not-5xx", "role function"),
        ([{"role": "user", "content": None}], "not-5xx", "content null"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "not-5xx",
         "an image to a text model"),
        ([{"role": "user", "content": [{"type": "bogus", "x": 1}]}], "not-5xx", "content part of unknown type"),
        ([{"role": "assistant", "content": "I"}, {"role": "assistant", "content": "think"}], "not-5xx",
         "assistant only"),
        ([], "not-5xx", "no messages"),
        ([[{"role": "user", "content": GOOD_PROMPT}]], "4xx", "messages nested in a list"),
    ])
    body = _base(rng, model, True, rng.random() < 0.35)
    body["messages"] = messages
    return {"endpoint": CHAT, "body": body, "expect": expect, "note": note}


def _refused_param(rng, model):
    field, value, expect = rng.choice([
        ("n", 2, "4xx"), ("best_of", 3, "4xx"), ("logprobs", 2, "4xx"), ("seed", 7, "not-5xx"), ("min_p", 0.1, "not-5xx"),
        ("min_tokens", 4, "4xx"), ("logit_bias", {"5": 10}, "4xx"), ("allowed_token_ids", [1, 2], "4xx"),
        ("prompt_logprobs", 1, "4xx"), ("use_beam_search", True, "not-5xx"),
        ("vllm_xargs", {"block_length": 32}, "4xx"), ("vllm_xargs", {"temperature": 0.5}, "4xx"),
        ("vllm_xargs", {"method": "vanilla"}, "4xx"), ("vllm_xargs", {"method": "streaming"}, "4xx"),
        ("vllm_xargs", {"dcu": True}, "4xx"), ("vllm_xargs", {"cache": "none"}, "4xx"),
        ("vllm_xargs", {"rule": "quota"}, "4xx"), ("vllm_xargs", {"replay": "trace"}, "4xx"),
        ("vllm_xargs", {"method": "odb-alp", "suffix_window": 16}, "4xx"), ("vllm_xargs", {"jump": True}, "not-5xx"),
        ("vllm_xargs", {"alp": True}, "not-5xx"), ("vllm_xargs", {"jump": False}, "not-5xx"),
    ])
    chat = rng.random() < 0.3 and field not in ("best_of", "prompt_logprobs")
    body = _base(rng, model, chat, rng.random() < 0.35)
    if chat and field == "logprobs":
        body["logprobs"], body["top_logprobs"] = True, value
    else:
        body[field] = value
    if field == "seed" and rng.random() < 0.5:  # a greedy request's seed is dropped; a sampled one's refused
        body["temperature"], expect = 0.7, "4xx"
    return {"endpoint": CHAT if chat else COMPLETIONS, "body": body, "expect": expect,
            "note": f"{field}={json.dumps(value)[:60]}"}


_MAKERS = {"bad_json": _bad_json, "wrong_type": _wrong_type, "out_of_range": _out_of_range,
           "unknown_knob": _unknown_knob, "misspelled_knob": _misspelled_knob, "huge_max_tokens": _huge_max_tokens,
           "odd_unicode": _odd_unicode, "wrong_role": _wrong_role, "refused_param": _refused_param}


def fuzz_cases(n: int, seed: int, model: str) -> list[dict]:
    """``n`` malformed requests for ``model`` (the served name), round-robin over ``CATEGORIES``
    in a seeded order. Each: ``id``, ``category``, ``endpoint``, one of ``body`` (a JSON value),
    ``raw`` (text) or ``raw_hex`` (bytes), ``content_type``, ``stream``, ``expect`` (``4xx`` or
    ``not-5xx``) and a ``note``. Pure: the same arguments give the same cases."""
    rng = random.Random(seed)
    order = list(CATEGORIES)
    rng.shuffle(order)
    cases = []
    for i in range(n):
        category = order[i % len(order)]
        case = {"id": i, "category": category, "content_type": "application/json", "body": None, "raw": None,
                "raw_hex": None, **_MAKERS[category](rng, model)}
        case["stream"] = bool(isinstance(case["body"], dict) and case["body"].get("stream") is True)
        cases.append(case)
    return cases


def payload(case: dict) -> bytes:
    """The bytes a case sends."""
    if case.get("raw_hex") is not None:
        return bytes.fromhex(case["raw_hex"])
    if case.get("raw") is not None:
        return case["raw"].encode("utf-8", "surrogatepass")
    # ensure_ascii: lone surrogates travel as JSON escapes, the way a client would send them
    return json.dumps(case["body"], ensure_ascii=True).encode()


def judge(case: dict, answer: dict) -> str | None:
    """What is wrong with ``answer`` (``status``: the effective code, 0 for no answer;
    ``timeout``) for ``case``, or None."""
    status = answer.get("status", 0)
    if answer.get("timeout"):
        return "no answer within the timeout"
    if status == 0:
        return f"no HTTP answer ({answer.get('exception', 'connection failed')})"
    if status >= 500:
        return f"server error {status}"
    if case["expect"] == "4xx" and not 400 <= status < 500:
        return f"expected a 4xx, got {status}"
    return None


# ---- against a server -----------------------------------------------------------------------------
async def send(session, url: str, case: dict, timeout: float) -> dict:
    """One case -> its answer: ``status`` (for a 200 stream, the code of an error event in it),
    ``http_status``, ``body`` (the start of it), ``seconds``."""
    import aiohttp

    t0 = time.time()
    answer = {"status": 0}
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + case["endpoint"], data=payload(case),
                                    headers={"Content-Type": case["content_type"]}) as resp:
                answer["http_status"] = answer["status"] = resp.status
                text = (await resp.read()).decode("utf-8", "replace")
                answer["body"] = text[:400]
                if resp.status == 200 and case["stream"]:
                    for line in text.splitlines():
                        code = serving.error_code(serving.sse_data(line))
                        if code is not None:
                            answer["status"] = code
                            break
    except TimeoutError:
        answer["timeout"] = True
    except aiohttp.ClientError as e:
        answer["exception"] = f"{type(e).__name__}: {e}"
    answer["seconds"] = round(time.time() - t0, 3)
    return answer


async def run_cases(url: str, cases: list[dict], concurrency: int, timeout: float) -> list[dict]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)

    async def one(session, case):
        async with sem:
            return await send(session, url, case, timeout)

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(session, c) for c in cases))


def good_request(url: str, model: str, timeout: float = 120.0) -> tuple[int, str]:
    """(status, text) of a plain greedy chat completion (the format the tiny checkpoints answer in:
    a raw-text prompt may end at once, and two empty answers prove nothing)."""
    import urllib.request

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": GOOD_PROMPT}], "max_tokens": 64,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(url + CHAT, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())["choices"][0]["message"]["content"]
    except Exception as e:  # the check below reports it
        return getattr(e, "code", 0), f"{type(e).__name__}: {e}"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="checkpoints/tiny-llada", help="checkpoint to serve (ignored with --url)")
    ap.add_argument("--speculative", action="store_true", help="serve with --speculative odb")
    ap.add_argument("--url", help="attach to this running server instead of starting one")
    ap.add_argument("--port", type=int, default=8771)
    ap.add_argument("--n", type=int, default=200, help="malformed requests")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--eager", action="store_true", help="serve without CUDA graphs (starts faster)")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    serving.prepare_out(args.out)
    cmd = None if args.url else serving.serve_command(args.model, args.port, args.speculative,
                                                      ["--enforce-eager"] if args.eager else [])
    t0 = time.time()
    with serving.Server(cmd=cmd, url=args.url) as server:
        model = server.model_name()
        before = good_request(server.url, model)
        cases = fuzz_cases(args.n, args.seed, model)
        t1 = time.time()
        answers = asyncio.run(run_cases(server.url, cases, args.concurrency, args.timeout))
        t_cases = time.time() - t1
        health = serving.get(f"{server.url}/health")[0]
        after = good_request(server.url, model)
        for _ in range(60):  # cases that generated (not-5xx ones) drain
            running, waiting = serving.requests_in_flight(server.metrics())
            if running == 0 and waiting == 0:
                break
            time.sleep(0.5)
        log = server.log_tail()
    failures = []
    for case, answer in zip(cases, answers):
        case["answer"] = answer
        problem = judge(case, answer)
        if problem:
            case["problem"] = problem
            failures.append(case)
    by_category: dict = {}
    for case in cases:
        row = by_category.setdefault(case["category"], {"cases": 0, "4xx": 0, "2xx": 0, "failures": 0})
        row["cases"] += 1
        status = case["answer"]["status"]
        if 400 <= status < 500:
            row["4xx"] += 1
        elif 200 <= status < 300:
            row["2xx"] += 1
        if "problem" in case:
            row["failures"] += 1
    good_ok = before[0] == 200 and bool(before[1].strip()) and after == before
    summary = {
        "model": args.url or args.model, "speculative": args.speculative, "cases": len(cases), "seed": args.seed,
        "failures": len(failures), "by_category": by_category,
        "status_counts": _counts(c["answer"]["status"] for c in cases),
        "timeouts": sum(bool(c["answer"].get("timeout")) for c in cases),
        "health_after": health, "running_after": running, "waiting_after": waiting,
        "good_request": {"before": before, "after": after, "same": good_ok},
        "seconds": {"cases": round(t_cases, 1), "total": round(time.time() - t0, 1)},
    }
    ok = not failures and health == 200 and good_ok and running == 0 and waiting == 0
    summary["ok"] = ok
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "cases": cases, "server_log_tail": log}, f, indent=1)
    print(json.dumps(summary))
    for case in failures[:20]:
        print("FAIL", json.dumps({k: case.get(k) for k in ("id", "category", "note", "expect", "problem")}))
    return 0 if ok else 1


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))
