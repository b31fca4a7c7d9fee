"""``python -m vllm_odb.bench server-faults``: injected failures against a loopback ``vllm serve``
of a tiny checkpoint, started with ``VLLM_ODB_DEBUG_FAULTS=1`` (engine/faults.py; needs a GPU).

    python -m vllm_odb.bench server-faults --model checkpoints/tiny-llada --speculative --out faults.json

Three phases (``--phases``), each with its own server:

``requests``  One request's step fails; the others and the server go on. ``--requests`` requests
    (completions and chat, streaming and not) run at once, first alone as the baseline, then
    again beside faulted copies of some of them: NaN logits or a raise in the request's own step,
    at its first or second forward (every request takes those: the refresh of its first block and
    the next step) and at later ones. A request faulted at forward 1 or 2 must end with an error
    (HTTP 500, or an error event in its stream); one faulted later ends with an error, or, if its
    answer was done before that forward, with its baseline answer. Every other request must
    equal its baseline, nothing may hang, and afterwards the server is healthy and idle, the KV
    cache's free blocks are back, ``vllm:request_success_total{finished_reason="error"}`` counted
    exactly the requests that ended with an error, and a good request still gets its answer.
``crash``  The whole step fails (``crash``: as a failing model runner would): vLLM's engine core
    dies. Every client in flight must get an answer (an error, or a dropped connection) within
    ``--crash-timeout`` seconds, never hang; ``/health`` must stop answering 200 (503, or no
    answer) and never answer 200 again; the server exits (vLLM 0.26 shuts the API server down
    when its engine dies).
``keep-alive``  The same crash with ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``, vLLM's switch to keep
    the API server up: ``/health`` must answer 503, and a new request an error, not hang.

Writes a JSON report (``--out``) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from vllm_odb.bench import serving, soak

PHASES = ("requests", "crash", "keep-alive")
# (fault, stream): the copies of the first requests that carry one
FAULTS = (("nan@1", True), ("nan@2", False), ("raise@1", False), ("raise@2", True), ("nan@5", True),
          ("raise@6", False))
EARLY = 2  # faults at forwards <= EARLY always fire


def fault_requests(n: int, seed: int, speculative: bool, model: str) -> list[dict]:
    """``n`` plain requests (suite questions; completions by token ids and chat; every other one
    streams), max_tokens 64. Methods without drafts (``fast-dllm``, ``odb-alp``), whose answers do
    not depend on the batch they share (soak.py's doc): the faulted copies add ``odb`` ones on a
    jump-share engine."""
    methods = soak.METHODS_DEFAULT
    convs = soak.suite_conversations(n, seed)
    plan = [{"i": i, "prompt": i, "api": "chat" if i % 3 == 1 else "completions", "method": methods[i % len(methods)],
             "max_tokens": 64, "abort_after": 0, "stream": i % 2 == 0} for i in range(n)]
    soak.attach_inputs(plan, convs, model)
    return plan


def faulted_copies(plan: list[dict], speculative: bool) -> list[dict]:
    """A copy of one of the first requests per fault of ``FAULTS``; on a jump-share engine every
    other one asks for ``odb`` (the fault then hits a drafting request)."""
    return [{**plan[j % len(plan)], "i": len(plan) + j, "fault": fault, "stream": stream,
             "xargs": {"debug_fault": fault}, **({"method": "odb"} if speculative and j % 2 else {})}
            for j, (fault, stream) in enumerate(FAULTS)]


async def fetch_one(session, base: str, model: str, r: dict, timeout: float) -> dict:
    """One request, streaming (``soak.stream_one``) or not: ``status``, ``text``, ``error``, ..."""
    import aiohttp

    if r["stream"]:
        return await soak.stream_one(session, base, model, r, timeout)
    body = soak.body(r, model)
    body["stream"] = False
    body.pop("stream_options")
    got = {"status": 0}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(f"{base}/v1/{'chat/completions' if r['api'] == 'chat' else 'completions'}",
                                    json=body) as resp:
                got["status"] = resp.status
                text = await resp.text()
                if resp.status != 200:
                    got["error"] = text[:300]
                else:
                    data = json.loads(text)
                    c = data["choices"][0]
                    got.update(done=True, text=c.get("text") if r["api"] == "completions" else c["message"]["content"],
                               finish_reason=c.get("finish_reason"), usage=data.get("usage"))
    except TimeoutError:
        got["timeout"] = True
    except aiohttp.ClientError as e:
        got["exception"] = f"{type(e).__name__}: {e}"
    got["latency"] = time.perf_counter() - t0
    return got


async def fetch_all(base: str, model: str, reqs: list[dict], timeout: float, delays: dict | None = None) -> list:
    import aiohttp

    async def one(session, r):
        await asyncio.sleep((delays or {}).get(r["i"], 0.0))
        return await fetch_one(session, base, model, r, timeout)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return await asyncio.gather(*(one(session, r) for r in reqs))


def ended_with_error(got: dict) -> bool:
    return got.get("status", 0) >= 500 and bool(got.get("error")) and not got.get("timeout")


def judge_requests(plan: list[dict], faulted: list[dict], baseline: list[dict], run: list[dict]) -> list[str]:
    """Problems of the ``requests`` phase (module doc)."""
    problems = []
    for r, base, got in zip(plan, baseline, run[:len(plan)]):
        if base.get("status") != 200 or not base.get("done"):
            problems.append(f"request {r['i']}: baseline answer {base.get('status')} {base.get('error')}")
        elif got.get("status") != 200 or got.get("text") != base.get("text"):
            problems.append(f"request {r['i']} beside the faulted ones: {got.get('status')}, text "
                            f"{'equal' if got.get('text') == base.get('text') else 'differs'}")
    for r, got in zip(faulted, run[len(plan):]):
        at = int(r["fault"].split("@")[1])
        if got.get("timeout"):
            problems.append(f"faulted request {r['i']} ({r['fault']}): no answer")
        elif ended_with_error(got):
            continue
        elif at <= EARLY:
            problems.append(f"faulted request {r['i']} ({r['fault']}) did not end with an error: {got.get('status')}")
        elif got.get("status") != 200 or not got.get("done"):
            problems.append(f"faulted request {r['i']} ({r['fault']}) ended with {got.get('status')}")
        elif r["method"] != "odb" and got.get("text") != baseline[r["prompt"] % len(plan)].get("text"):
            problems.append(f"faulted request {r['i']} ({r['fault']}) completed with another answer")
    return problems


def phase_requests(args, env: dict) -> dict:
    plan = fault_requests(args.requests, args.seed, args.speculative, args.model)
    faulted = faulted_copies(plan, args.speculative)
    cmd = serving.serve_command(args.model, args.port, args.speculative, ["--enforce-eager"] if args.eager else [])
    with serving.Server(cmd=cmd, env=env, log_path=_log("requests")) as server:
        model = server.model_name()
        start = server.metrics()
        baseline = asyncio.run(fetch_all(server.url, model, plan, args.timeout))
        before = server.metrics()
        run = asyncio.run(fetch_all(server.url, model, plan + faulted, args.timeout))
        for _ in range(120):
            end = server.metrics()
            if serving.requests_in_flight(end) == (0.0, 0.0) and \
                    serving.kv_blocks(end)["free_blocks"] == serving.kv_blocks(start)["free_blocks"]:
                break
            time.sleep(0.5)
        good = asyncio.run(fetch_all(server.url, model, plan[:1], args.timeout))[0]
        health = serving.get(f"{server.url}/health")[0]
        log = server.log_tail()
    problems = judge_requests(plan, faulted, baseline, run)
    errored = sum(ended_with_error(g) for g in run)
    counted = serving.finished_by_reason(end).get("error", 0.0) - serving.finished_by_reason(before).get("error", 0.0)
    if counted != errored:
        problems.append(f"vllm:request_success_total{{finished_reason=error}} counted {counted}, {errored} ended so")
    kv0, kv1 = serving.kv_blocks(start), serving.kv_blocks(end)
    if kv0["free_blocks"] is None or kv0["free_blocks"] != kv1["free_blocks"]:
        problems.append(f"KV free blocks {kv0['free_blocks']} -> {kv1['free_blocks']}")
    if serving.requests_in_flight(end) != (0.0, 0.0):
        problems.append(f"requests running/waiting after: {serving.requests_in_flight(end)}")
    if health != 200 or good.get("text") != baseline[0].get("text"):
        problems.append(f"after: /health {health}, good request {good.get('status')}")
    return {"problems": problems, "requests": len(plan), "faulted": [
        {"fault": r["fault"], "stream": r["stream"], "api": r["api"], "method": r["method"],
         "ended_with_error": ended_with_error(g), "status": g.get("status"), "error": g.get("error"),
         "seconds": round(g.get("latency", 0.0), 3)} for r, g in zip(faulted, run[len(plan):])],
        "others_equal_baseline": sum(g.get("text") == b.get("text") and g.get("status") == 200
                                     for b, g in zip(baseline, run[:len(plan)])),
        "errors_counted_by_vllm": counted, "kv_cache": {"start": kv0, "end": kv1}, "health_after": health,
        "server_log_tail": log if problems else [line for line in log if "vllm-odb: request" in line][-20:]}


def phase_crash(args, env: dict, keep_alive: bool) -> dict:
    """The engine core dies under load (module doc)."""
    plan = fault_requests(max(4, args.requests // 2), args.seed + 1, args.speculative, args.model)
    for r in plan:
        r["stream"] = True
    crash = {**plan[0], "i": len(plan), "stream": False, "xargs": {"debug_fault": "crash@2"}}
    env = {**env, **({"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"} if keep_alive else {})}
    cmd = serving.serve_command(args.model, args.port, args.speculative, ["--enforce-eager"])
    problems, health_seen = [], []
    with serving.Server(cmd=cmd, env=env, log_path=_log("keep-alive" if keep_alive else "crash")) as server:
        model = server.model_name()
        t0 = time.time()

        async def go():
            clients = asyncio.ensure_future(fetch_all(server.url, model, plan + [crash], args.crash_timeout,
                                                      {crash["i"]: 0.3}))
            down_at = None
            while time.time() - t0 < args.crash_timeout:
                code = await asyncio.to_thread(serving.get, f"{server.url}/health", 2.0)
                health_seen.append((round(time.time() - t0, 2), code[0]))
                if code[0] != 200 and down_at is None:
                    down_at = time.time() - t0
                if down_at is not None and (clients.done() and time.time() - t0 > down_at + 5):
                    break
                await asyncio.sleep(0.25)
            return await clients, down_at

        got, down_at = asyncio.run(go())
        after = None
        if keep_alive:
            after = asyncio.run(fetch_all(server.url, model, plan[:1], 30.0))[0]
            health_seen.append((round(time.time() - t0, 2), serving.get(f"{server.url}/health")[0]))
        exit_s = None
        if not keep_alive and server.proc is not None:
            try:
                server.proc.wait(timeout=90)
                exit_s = round(time.time() - t0, 1)
            except Exception:
                pass
        log = server.log_tail()
    hung = [r["i"] for r, g in zip(plan + [crash], got) if g.get("timeout")]
    if hung:
        problems.append(f"requests with no answer within {args.crash_timeout}s: {hung}")
    if down_at is None:
        problems.append("/health kept answering 200 after the engine crashed")
    elif any(code == 200 for t, code in health_seen if t > down_at):
        problems.append("/health answered 200 again after it failed")
    if keep_alive:
        if not any(code == 503 for _, code in health_seen):
            problems.append("with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1, /health never answered 503")
        if after is None or after.get("timeout") or after.get("status") == 200:
            problems.append(f"a request after the crash got {after}")
    elif exit_s is None:
        problems.append("the server did not exit within 90s of the crash")
    return {"problems": problems, "in_flight": len(plan), "health_failed_after_s": down_at,
            "health_codes": sorted({code for _, code in health_seen}), "server_exit_s": exit_s,
            "answers": [{"status": g.get("status"), "done": bool(g.get("done")), "error": (g.get("error") or "")[:120],
                         "exception": g.get("exception"), "seconds": round(g.get("latency", 0.0), 2)} for g in got],
            "request_after": after, "server_log_tail": log[-40:]}


def _log(phase: str) -> str:
    """Each phase's server log: ``$SERVER_LOG``'s stem (default /tmp/vllm-odb-server) + the phase."""
    stem = os.environ.get("SERVER_LOG", "/tmp/vllm-odb-server.log").removesuffix(".log")
    return f"{stem}-{phase}.log"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="checkpoints/tiny-llada")
    ap.add_argument("--speculative", action="store_true", help="serve with --speculative odb")
    ap.add_argument("--port", type=int, default=8773)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {list(PHASES)}")
    ap.add_argument("--requests", type=int, default=12, help="plain requests beside the faulted ones")
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--crash-timeout", type=float, default=60.0, help="seconds for every client to get an answer")
    ap.add_argument("--eager", action="store_true", help="the requests phase without CUDA graphs (the crash "
                    "phases always run eager: they start faster)")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    serving.prepare_out(args.out)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise SystemExit(f"--phases: unknown {unknown}; choose from {list(PHASES)}")
    env = {"VLLM_ODB_DEBUG_FAULTS": "1"}
    t0 = time.time()
    results = {}
    for phase in phases:
        t = time.time()
        if phase == "requests":
            results[phase] = phase_requests(args, env)
        else:
            results[phase] = phase_crash(args, env, keep_alive=phase == "keep-alive")
        results[phase]["seconds"] = round(time.time() - t, 1)
    ok = all(not r["problems"] for r in results.values())
    summary = {"model": args.model, "speculative": args.speculative, "phases": phases, "ok": ok,
               "problems": {p: r["problems"] for p, r in results.items()}, "seconds": round(time.time() - t0, 1)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, **results}, f, indent=1)
    print(json.dumps(summary))
    return 0 if ok else 1
