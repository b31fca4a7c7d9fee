"""``python -m vllm_odb.bench server-soak``: a loopback ``vllm serve`` of a tiny checkpoint under a
load well past its batch (needs a GPU).

    python -m vllm_odb.bench server-soak --model checkpoints/tiny-llada --requests 1000 --clients 200 \\
        --max-seconds 540 --out soak.json            # the default engine (fast-dllm, odb-alp)
    python -m vllm_odb.bench server-soak --model checkpoints/tiny-llada --speculative ...   # + odb

1. The plan (``soak_plan``, pure, seeded): ``--requests`` requests over suite conversations of
   mixed lengths (one question, or a question after an earlier one and its answer), completions
   (token ids) and chat, mixed methods (``fast-dllm``, ``odb-alp``, and
   ``odb`` on a ``--speculative odb`` engine: the default engine has no jump-share canvas and
   refuses it), mixed ``max_tokens``; a third get a stop string, a quarter (``--abort-frac``) close
   their stream after their first chunks.
2. Expected outputs, offline, in this process before the server starts: vLLM's ``LLM`` with the
   server's engine settings, greedy. Stop strings are picked from a first pass's text and the
   requests that have one run again with it: a stop string is an end marker to the engine (ALP
   may cut the canvas at it, early stop ends there), so its answer is not the first one truncated.
3. ``vllm serve`` (or ``--url``); ``--clients`` concurrent streaming clients send the plan, each
   request with a timeout, all within ``--max-seconds``.
4. Checks (``compare``): every completed stream equals its offline text, finish reason and token
   counts; an aborted stream's text is a prefix of its offline text; no request errs or hangs;
   for ``odb`` requests (jump-share drafts) the text is compared and reported, but a difference
   fails the run only with ``--strict-odb``: which drafts a request gets depends on how many
   requests share the step's draft budget, and a verified draft may lead to another verified
   state, so equality across different batches is only promised without drafts (BENCHMARKS.md,
   the server loopback);
   afterwards no request running or waiting and the KV cache's free blocks back to their start
   (``/metrics``: ``vllm:kv_cache_usage_perc`` and ``vllm:cache_config_info``'s pool size).
   Recorded: p50/p99 latency and time to first chunk, requests/s and output tokens/s.

Writes a JSON report (``--out``) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from vllm_odb.bench import serving

METHODS_DEFAULT = ("fast-dllm", "odb-alp")
METHODS_SPECULATIVE = ("fast-dllm", "odb-alp", "odb")
MAX_TOKENS = (8, 16, 24, 40, 64)


# ---- the plan (pure) -----------------------------------------------------------------------------
def soak_plan(n: int, seed: int, prompt_lengths: list[int], methods: tuple[str, ...], abort_frac: float = 0.25,
              stop_frac: float = 1 / 3, chat_frac: float = 0.4) -> list[dict]:
    """``n`` requests over prompts of ``prompt_lengths`` (index -> length): short, medium and long
    prompts (thirds by length) equally often, each request's api, method, ``max_tokens``, whether
    it gets a stop string, and ``abort_after`` (close the stream after that many content chunks;
    0 = read it to the end; exactly ``round(abort_frac * n)`` requests abort)."""
    rng = random.Random(seed)
    order = sorted(range(len(prompt_lengths)), key=lambda i: (prompt_lengths[i], i))
    k = max(1, len(order) // 3)
    thirds = [order[:k], order[k:2 * k] or order[:k], order[2 * k:] or order[:k]]
    aborts = set(rng.sample(range(n), round(abort_frac * n)))
    plan = []
    for i in range(n):
        plan.append({
            "i": i,
            "prompt": rng.choice(thirds[i % 3]),
            "length": ("short", "medium", "long")[i % 3],
            "api": "chat" if rng.random() < chat_frac else "completions",
            "method": methods[rng.randrange(len(methods))],
            "max_tokens": rng.choice(MAX_TOKENS),
            "wants_stop": rng.random() < stop_frac,
            "abort_after": rng.choice((1, 1, 2, 3)) if i in aborts else 0,
        })
    return plan


def pick_stop(text: str, rng: random.Random) -> str | None:
    """A stop string that occurs in ``text`` (from its second half, two characters, not blank),
    or None when the text is too short to have one."""
    if len(text) < 6:
        return None
    for _ in range(8):
        a = rng.randrange(len(text) // 2, len(text) - 1)
        stop = text[a:a + 2]
        if stop.strip():
            return stop
    return None


TEXT_PROBLEMS = ("text differs", "aborted stream is not a prefix of the offline text")


def compare(req: dict, got: dict) -> list[str]:
    """What differs between a request's offline answer (``req``: ``expected``, ``expected_tokens``,
    ``prompt_tokens``, ``finish_reason``) and what its stream gave (``got``: ``status``, ``text``,
    ``usage``, ``finish_reason``, ``aborted``, ``timeout``, ``error``)."""
    if got.get("timeout"):
        return ["no answer within the timeout"]
    if got.get("exception"):
        return [f"connection: {got['exception']}"]
    if got.get("status") != 200 or got.get("error"):
        return [f"error {got.get('status')}: {str(got.get('error'))[:200]}"]
    text = got.get("text", "")
    if got.get("aborted"):
        return [] if req["expected"].startswith(text) else ["aborted stream is not a prefix of the offline text"]
    problems = []
    if not got.get("done"):
        problems.append("stream ended without [DONE]")
    if text != req["expected"]:
        problems.append("text differs")
    usage = got.get("usage") or {}
    if text == req["expected"]:  # a different text has its own finish reason and length
        if got.get("finish_reason") != req["finish_reason"]:
            problems.append(f"finish_reason {got.get('finish_reason')} != {req['finish_reason']}")
        if usage.get("completion_tokens") != req["expected_tokens"]:
            problems.append(f"completion_tokens {usage.get('completion_tokens')} != {req['expected_tokens']}")
    elif not got.get("finish_reason") or not usage.get("completion_tokens"):
        problems.append("no finish reason or token count")
    if usage.get("prompt_tokens") != req["prompt_tokens"]:
        problems.append(f"prompt_tokens {usage.get('prompt_tokens')} != {req['prompt_tokens']}")
    return problems


def latency_summary(results: list[dict], seconds: float) -> dict:
    """p50/p99 latency and time to first chunk (completed streams), requests/s and output tokens/s."""
    done = [r for r in results if r.get("done") and not r.get("aborted")]
    lat = [r["latency"] for r in done]
    ttft = [r["ttft"] for r in done if r.get("ttft") is not None]
    tokens = sum((r.get("usage") or {}).get("completion_tokens", 0) for r in done)
    rnd = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {"latency_s": {"p50": rnd(serving.percentile(lat, 50)), "p99": rnd(serving.percentile(lat, 99)),
                          "max": rnd(max(lat) if lat else None)},
            "first_chunk_s": {"p50": rnd(serving.percentile(ttft, 50)), "p99": rnd(serving.percentile(ttft, 99))},
            "completed_per_s": rnd(len(done) / seconds if seconds > 0 else None),
            "output_tokens_per_s": rnd(tokens / seconds if seconds > 0 else None), "output_tokens": tokens}


# ---- inputs and the offline answers ------------------------------------------------------------------
def suite_conversations(count: int, seed: int) -> list[list[dict]]:
    """``count`` conversations over suite problems: two thirds a single question, a third a
    question after an earlier one and its answer (a prompt about three times longer)."""
    from vllm_odb.tiny.suite import make_suite

    examples = make_suite(seed, count + count // 3)
    convs = [[{"role": "user", "content": ex.prompt}] for ex in examples[:count]]
    for j, ex in enumerate(examples[count:]):
        convs[3 * j + 2] = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.answer},
                            *convs[3 * j + 2]]
    return convs


def conversation_length(conv: list[dict]) -> int:
    return sum(len(m["content"]) for m in conv)


def attach_inputs(plan: list[dict], convs: list[list[dict]], model: str) -> None:
    """Each request's messages (chat) or token ids (completions: the chat-formatted conversation,
    as the tiny models were trained, without an added BOS: offline and served alike)."""
    from vllm_odb.reference.loader import load_tokenizer

    tok = load_tokenizer(model)
    ids = {}
    for r in plan:
        r["messages"] = convs[r["prompt"]]
        if r["api"] == "completions":
            if r["prompt"] not in ids:
                text = tok.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=False)
                ids[r["prompt"]] = tok(text, add_special_tokens=False)["input_ids"]
            r["ids"] = ids[r["prompt"]]


def offline(model: str, plan: list[dict], speculative: bool, seed: int, eager: bool = False) -> None:
    """Fill each request's ``expected`` text, ``expected_tokens``, ``prompt_tokens`` and
    ``finish_reason`` from vLLM's ``LLM`` with the server's engine settings; stop strings from a
    first pass (module doc)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {"speculative_config": {"method": "odb"}} if speculative else {}
    if eager:
        kwargs["enforce_eager"] = True
    llm = LLM(model=model, dtype="float32", max_model_len=serving.MAX_MODEL_LEN, seed=0, **serving.memory_kwargs(),
              additional_config={"odb": serving.engine_section(speculative)}, **kwargs)

    def run(llm, reqs):
        sps = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], stop=r.get("stop"),
                              extra_args={"method": r["method"]}) for r in reqs]
        chat = [i for i, r in enumerate(reqs) if r["api"] == "chat"]
        comp = [i for i, r in enumerate(reqs) if r["api"] == "completions"]
        outs = {}
        if chat:
            got = llm.chat([reqs[i]["messages"] for i in chat], [sps[i] for i in chat], use_tqdm=False)
            outs.update(zip(chat, got))
        if comp:
            got = llm.generate([TokensPrompt(prompt_token_ids=reqs[i]["ids"]) for i in comp], [sps[i] for i in comp],
                               use_tqdm=False)
            outs.update(zip(comp, got))
        for i, r in enumerate(reqs):
            o = outs[i]
            r["expected"], r["expected_tokens"] = o.outputs[0].text, len(o.outputs[0].token_ids)
            r["prompt_tokens"], r["finish_reason"] = len(o.prompt_token_ids), o.outputs[0].finish_reason

    run(llm, plan)
    rng = random.Random(seed)
    stopped = []
    for r in plan:
        if r["wants_stop"] and (stop := pick_stop(r["expected"], rng)) is not None:
            r["stop"] = [stop]
            stopped.append(r)
    if stopped:
        run(llm, stopped)
    del llm  # its engine goes; the server below needs the GPU


# ---- the load ------------------------------------------------------------------------------------
def body(r: dict, model: str) -> dict:
    b = {"model": model, "max_tokens": r["max_tokens"], "temperature": 0.0, "stream": True,
         "stream_options": {"include_usage": True}, "vllm_xargs": {"method": r["method"], **r.get("xargs", {})}}
    if r.get("stop"):
        b["stop"] = r["stop"]
    if r["api"] == "chat":
        b["messages"] = r["messages"]
    else:
        b["prompt"] = r["ids"]  # token ids: the offline prompt, no added BOS
    return b


async def stream_one(session, base: str, model: str, r: dict, timeout: float) -> dict:
    """One streaming request: ``status``, ``text``, ``chunks``, ``usage``, ``finish_reason``,
    ``done`` ([DONE] seen), ``aborted`` (closed by us), ``ttft``, ``latency``; or ``timeout``,
    ``exception``, ``error`` (an error event)."""
    import aiohttp

    url = f"{base}/v1/{'chat/completions' if r['api'] == 'chat' else 'completions'}"
    got = {"status": 0, "chunks": 0}
    text = []
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(max(1.0, timeout)):
            async with session.post(url, json=body(r, model)) as resp:
                got["status"] = resp.status
                if resp.status != 200:
                    got["error"] = (await resp.text())[:300]
                else:
                    async for raw in resp.content:
                        data = serving.sse_data(raw.decode("utf-8", "replace"))
                        if data is None:
                            continue
                        if data == "[DONE]":
                            got["done"] = True
                            break
                        code = serving.error_code(data)
                        if code is not None:
                            got["status"], got["error"] = code, json.dumps(data)[:300]
                            break
                        if data.get("usage"):
                            got["usage"] = data["usage"]
                        for c in data.get("choices") or []:
                            if c.get("finish_reason"):
                                got["finish_reason"] = c["finish_reason"]
                        piece = serving.stream_text(data, r["api"])
                        if piece:
                            if not got["chunks"]:
                                got["ttft"] = time.perf_counter() - t0
                            text.append(piece)
                            got["chunks"] += 1
                            if r["abort_after"] and got["chunks"] >= r["abort_after"]:
                                got["aborted"] = True
                                resp.close()  # drop the connection mid-generation
                                break
    except TimeoutError:
        got["timeout"] = True
    except aiohttp.ClientError as e:
        got["exception"] = f"{type(e).__name__}: {e}"
    got["latency"] = time.perf_counter() - t0
    got["text"] = "".join(text)
    return got


async def load(base: str, model: str, plan: list[dict], clients: int, timeout: float, deadline: float) -> None:
    """``clients`` concurrent clients work through ``plan`` (each result in ``r["got"]``); nothing
    new starts after ``deadline`` (time.time())."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for r in plan:
        queue.put_nowait(r)
    connector = aiohttp.TCPConnector(limit=clients)  # aiohttp's default pool is 100 connections
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client():
            while time.time() < deadline:
                try:
                    r = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r["got"] = await stream_one(session, base, model, r, min(timeout, deadline - time.time()))

        await asyncio.gather(*(client() for _ in range(clients)))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="checkpoints/tiny-llada")
    ap.add_argument("--speculative", action="store_true", help="serve (and run offline) with --speculative odb")
    ap.add_argument("--url", help="attach to this running server (started with the same model and --speculative)")
    ap.add_argument("--port", type=int, default=8772)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--abort-frac", type=float, default=0.25)
    ap.add_argument("--prompts", type=int, default=60, help="distinct conversations")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--max-seconds", type=float, default=540.0, help="bound on the whole run")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs, offline and served (starts faster)")
    ap.add_argument("--strict-odb", action="store_true", help="an odb request's text must equal offline too "
                    "(jump-share drafts depend on the batch: module doc)")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    serving.prepare_out(args.out)
    t_start = time.time()
    hard_end = t_start + args.max_seconds
    methods = METHODS_SPECULATIVE if args.speculative else METHODS_DEFAULT
    convs = suite_conversations(args.prompts, args.seed)
    plan = soak_plan(args.requests, args.seed, [conversation_length(c) for c in convs], methods, args.abort_frac)
    attach_inputs(plan, convs, args.model)
    offline(args.model, plan, args.speculative, args.seed, args.eager)
    t_offline = time.time() - t_start
    cmd = None if args.url else serving.serve_command(args.model, args.port, args.speculative,
                                                      ["--enforce-eager"] if args.eager else [])
    with serving.Server(cmd=cmd, url=args.url, start_timeout=max(60.0, hard_end - time.time() - 60)) as server:
        model = server.model_name()
        start = server.metrics()
        t0 = time.time()
        asyncio.run(load(server.url, model, plan, args.clients, args.timeout, hard_end - 45))
        t_load = time.time() - t0
        end = server.metrics()
        kv0 = serving.kv_blocks(start)
        while time.time() < hard_end - 10:  # aborted requests drain, their blocks come back
            end = server.metrics()
            running, waiting = serving.requests_in_flight(end)
            if running == 0 and waiting == 0 and serving.kv_blocks(end)["free_blocks"] == kv0["free_blocks"]:
                break
            time.sleep(0.5)
        health = serving.get(f"{server.url}/health")[0]
        metrics_text = serving.get(f"{server.url}/metrics")[1]
        log = server.log_tail()
    return report(args, plan, methods, start, end, health, metrics_text, t_offline, t_load, time.time() - t_start, log)


def report(args, plan, methods, start, end, health, metrics_text, t_offline, t_load, t_total, log=()) -> int:
    results = [r.get("got") for r in plan]
    unsent = sum(g is None for g in results)
    problems, odb_text = {}, {}
    for r in plan:
        if r.get("got") is not None:
            p = compare(r, r["got"])
            if p and r["method"] == "odb" and not args.strict_odb and set(p) <= set(TEXT_PROBLEMS):
                odb_text[r["i"]] = p  # jump-share: not promised across batches (module doc)
            elif p:
                problems[r["i"]] = p
    sent = [r for r in plan if r.get("got") is not None]
    aborted = [r for r in sent if r["got"].get("aborted")]
    completed = [r for r in sent if r["got"].get("done") and not r["got"].get("aborted")]
    kv0, kv1 = serving.kv_blocks(start), serving.kv_blocks(end)
    running, waiting = serving.requests_in_flight(end)
    reasons0, reasons1 = serving.finished_by_reason(start), serving.finished_by_reason(end)
    summary = {
        "model": args.url or args.model, "speculative": args.speculative, "eager": args.eager,
        "methods": list(methods),
        "planned": len(plan), "clients": args.clients, "sent": len(sent), "unsent": unsent,
        "completed": len(completed), "aborted": len(aborted),
        "aborts_planned_but_finished_first": sum(1 for r in completed if r["abort_after"]),
        "with_stop": sum(bool(r.get("stop")) for r in plan), "chat": sum(r["api"] == "chat" for r in plan),
        "by_method": {m: sum(r["method"] == m for r in plan) for m in methods},
        "failed": len(problems), "odb_text_differs": len(odb_text), "strict_odb": args.strict_odb,
        "failed_by_length": {k: sum(plan[i]["length"] == k for i in problems) for k in ("short", "medium", "long")},
        "failed_by_method": {m: sum(plan[i]["method"] == m for i in problems) for m in methods},
        "timeouts": sum(bool(r["got"].get("timeout")) for r in sent),
        "errors": sum(bool(r["got"].get("error") or r["got"].get("exception")) for r in sent),
        "kv_cache": {"start": kv0, "end": kv1, "returned": kv0["free_blocks"] == kv1["free_blocks"]
                     and kv0["free_blocks"] is not None},
        "running_after": running, "waiting_after": waiting, "health_after": health,
        "server_finished_by_reason": {k: v - reasons0.get(k, 0.0) for k, v in reasons1.items()},
        **latency_summary([r["got"] for r in sent], t_load),
        "seconds": {"offline": round(t_offline, 1), "load": round(t_load, 1), "total": round(t_total, 1),
                    "max": args.max_seconds},
    }
    ok = (not problems and unsent == 0 and summary["kv_cache"]["returned"] and running == 0 and waiting == 0
          and health == 200)
    summary["ok"] = ok
    if args.out:
        keys = ("i", "prompt", "api", "method", "max_tokens", "length", "stop", "abort_after", "expected",
                "expected_tokens", "finish_reason")
        rows = [{k: r.get(k) for k in keys} | {"got": r.get("got"),
                                                "problems": problems.get(r["i"], odb_text.get(r["i"]))} for r in plan]
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "requests": rows, "metrics_text_end": metrics_text,
                       "server_log_tail": list(log)}, f, indent=1)
    print(json.dumps(summary))
    for i, p in (list(problems.items()) + list(odb_text.items()))[:10]:
        r = plan[i]
        print("MISMATCH", json.dumps({"i": i, "api": r["api"], "method": r["method"], "stop": r.get("stop"),
                                      "problems": p, "expected": r["expected"][:120],
                                      "got": (r.get("got") or {}).get("text", "")[:120]}))
    return 0 if ok else 1
