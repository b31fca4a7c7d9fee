"""``python -m vllm_odb.bench server-loopback``: the OpenAI-compatible server on a shipped tiny
checkpoint, end to end (needs a GPU).

    python -m vllm_odb.bench server-loopback --model checkpoints/tiny-llada --clients 64 --out loopback.json

1. Offline: ``LLM(..., speculative_config={"method": "odb"}).generate/chat`` gives every request's
   expected text (mixed: ODB and plain fast-dllm requests, completions and chat, some with a stop
   string chosen from the first pass's output).
2. ``vllm serve <model> --speculative odb`` in a subprocess; ``--clients`` concurrent streaming
   clients send the same requests; about one in five aborts (closes the connection) after its first
   chunk. Every completed stream must equal its offline text, with matching usage counts and
   block-granular chunks (no more content chunks than blocks).
3. Bad requests, one by one: each must get HTTP 400 naming the knob, and the server keeps serving.
4. Afterwards: no request running or waiting, the KV-cache usage back to its starting value, and
   the dLLM counters (``vllm_odb:*``) on ``/metrics``.
Prints one JSON summary line; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from vllm_odb.bench.serving import memory_flags, memory_kwargs

BLOCK, GEN = 16, 64
# The draft budget and so a jump-share engine's canvas: 64 keeps the tiny engines small. (vLLM's
# kernel warm-up feeds token ids up to the canvas width, past the tiny checkpoints' 128-token
# vocabulary at the default 251; patches/warmup_ids.py keeps them inside it now.)
RIDGE_ROWS = 64


def requests_for(model: str, n: int, seed: int):
    """Suite prompts; completions get the chat-formatted text (the format the tiny models were
    trained on: raw text makes them guess among near-tied tokens, where any change of batch
    composition may flip an argmax, and vLLM does not promise batch-invariant numerics)."""
    from vllm_odb.reference.loader import load_tokenizer
    from vllm_odb.tiny.suite import make_suite

    tok = load_tokenizer(model)
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(make_suite(seed, n)):
        chat = i % 4 in (1, 2)
        text = ex.prompt if chat else tok.apply_chat_template([{"role": "user", "content": ex.prompt}],
                                                               add_generation_prompt=True, tokenize=False)
        out.append({"i": i, "text": text, "ids": None if chat else tok(text, add_special_tokens=False)["input_ids"], "method": "odb" if i % 2 == 0 else "fast-dllm",
                    "api": "chat" if chat else "completions", "abort": rng.random() < 0.2,
                    "max_tokens": rng.choice([16, 40, 64])})
    return out


def offline(model: str, reqs: list[dict], kv_blocks: int | None) -> None:
    """Fill each request's ``expected`` text and token count from ``LLM`` (stop strings picked from
    a first pass for every third request)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, **memory_kwargs(),
              speculative_config={"method": "odb"}, num_gpu_blocks_override=kv_blocks,
              additional_config={"odb": {"block_length": BLOCK, "gen_length": GEN, "ridge_rows": RIDGE_ROWS}})

    def run():
        for r in reqs:
            sp = SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], stop=r.get("stop"),
                                extra_args=None if r["method"] == "odb" else {"method": r["method"]})
            if r["api"] == "chat":
                o = llm.chat([{"role": "user", "content": r["text"]}], sp, use_tqdm=False)[0]
            else:  # the ids already hold the template's special tokens
                o = llm.generate([TokensPrompt(prompt_token_ids=r["ids"])], sp, use_tqdm=False)[0]
            r["expected"], r["expected_tokens"] = o.outputs[0].text, len(o.outputs[0].token_ids)
            r["prompt_tokens"] = len(o.prompt_token_ids)

    run()
    for r in reqs[::3]:
        t = r["expected"]
        if len(t) >= 6:
            r["stop"] = [t[len(t) // 2: len(t) // 2 + 2]]
    run()
    # the engine goes with this frame: the server below needs its GPU memory


def body(r: dict, model: str, stream: bool = True) -> dict:
    b = {"model": model, "max_tokens": r["max_tokens"], "temperature": 0.0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    if r.get("stop"):
        b["stop"] = r["stop"]
    if r["method"] != "odb":
        b["vllm_xargs"] = {"method": r["method"]}
    if r["api"] == "chat":
        b["messages"] = [{"role": "user", "content": r["text"]}]
    else:
        b["prompt"] = r.get("ids") or r["text"]  # token ids: the same prompt as offline, no added BOS
    return b


async def client(session, base: str, model: str, r: dict) -> None:
    url = f"{base}/v1/{'chat/completions' if r['api'] == 'chat' else 'completions'}"
    text, chunks, usage = [], 0, None
    async with session.post(url, json=body(r, model)) as resp:
        r["status"] = resp.status
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                usage = data["usage"]
            for c in data.get("choices", []):
                piece = c.get("text") if r["api"] == "completions" else (c.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    chunks += 1
            if r["abort"] and chunks:
                r["aborted"] = True
                resp.close()  # drop the connection mid-generation
                return
    r["got"], r["chunks"], r["usage"] = "".join(text), chunks, usage


async def concurrent_phase(base: str, model: str, reqs: list[dict]) -> None:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        await asyncio.gather(*(client(s, base, model, r) for r in reqs))


BAD = [  # (name, request body changes or raw text, what the error must name)
    ("unknown knob", {"vllm_xargs": {"thresh": 0.5}}, "thresh"),
    ("threshold out of range", {"vllm_xargs": {"threshold": 2}}, "threshold"),
    ("gen_length not a multiple of the block", {"vllm_xargs": {"gen_length": 40}}, "gen_length"),
    ("block_length changed", {"vllm_xargs": {"block_length": 32}}, "block_length"),
    ("n > 1", {"n": 2}, r"\bn\b"),
    ("best_of", {"best_of": 2}, "best_of"),
    ("logprobs", {"logprobs": 1}, "logprobs"),
    ("prompt past max_model_len", {"prompt": "word " * 700}, r"max_model_len|maximum context length|too long"),
    ("malformed JSON", "{\"model\": ", r"JSON|json|decode|parse"),
]


def bad_phase(base: str, model: str) -> list[dict]:
    import requests

    rows = []
    for name, change, must in BAD:
        url = f"{base}/v1/completions"
        if isinstance(change, str):
            resp = requests.post(url, data=change, headers={"Content-Type": "application/json"}, timeout=60)
        else:
            resp = requests.post(url, json={**body({"max_tokens": 16, "method": "odb", "api": "completions",
                                                    "text": "hi"}, model, stream=False), **change}, timeout=60)
        ok = resp.status_code == 400 and re.search(must, resp.text) is not None
        rows.append({"case": name, "status": resp.status_code, "ok": ok, "body": resp.text[:300]})
    good = requests.post(f"{base}/v1/completions", json=body({"max_tokens": 16, "method": "odb", "api": "completions",
                                                             "text": "Sort these letters: c b a"}, model, stream=False),
                         timeout=60)
    rows.append({"case": "good request after the bad ones", "status": good.status_code, "ok": good.status_code == 200,
                 "body": good.text[:300]})
    return rows


def scrape(base: str) -> dict[str, float]:
    import requests

    out: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        key = re.sub(r"\{.*\}", "", name)
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            pass
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--kv-blocks", type=int, help="a small KV pool (num_gpu_blocks_override) so blocks that "
                    "ALP cuts free are reused by other requests")
    ap.add_argument("--out")


def main(args: argparse.Namespace) -> int:
    faulthandler.dump_traceback_later(560, exit=True)
    import requests

    reqs = requests_for(args.model, args.clients, args.seed)
    t0 = time.time()
    offline(args.model, reqs, args.kv_blocks)
    t_offline = time.time() - t0
    base = f"http://127.0.0.1:{args.port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--speculative", "odb", "--dtype", "float32", "--max-model-len", "512",
           *memory_flags(), "--port", str(args.port), "--seed", "0",
           "--additional-config", json.dumps({"odb": {"block_length": BLOCK, "gen_length": GEN, "ridge_rows": RIDGE_ROWS}})]
    if args.kv_blocks:
        cmd += ["--num-gpu-blocks-override", str(args.kv_blocks)]
    log = open(os.environ.get("SERVER_LOG", "/tmp/server.log"), "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for _ in range(300):
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            time.sleep(1)
        model = requests.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        start = scrape(base)
        t0 = time.time()
        asyncio.run(concurrent_phase(base, model, reqs))
        t_clients = time.time() - t0
        bad = bad_phase(base, model)
        for _ in range(60):  # aborted requests drain
            m = scrape(base)
            if m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0:
                break
            time.sleep(0.5)
        end = scrape(base)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    done = [r for r in reqs if not r.get("aborted")]
    mism = [r for r in done if r.get("got") != r["expected"]]
    usage_bad = [r for r in done if not r.get("usage") or r["usage"]["completion_tokens"] != r["expected_tokens"]
                 or r["usage"]["prompt_tokens"] != r["prompt_tokens"]]
    coarse = [r for r in done if r.get("chunks", 0) > -(-r["expected_tokens"] // BLOCK) + 1]
    kv = ("vllm:kv_cache_usage_perc", start.get("vllm:kv_cache_usage_perc"), end.get("vllm:kv_cache_usage_perc"))
    # The server's own counts (the offline engine above wrote to the same metrics directory).
    odb_metrics = {k: round(v - (0 if k.endswith(("per_forward", "ratio")) else start.get(k, 0.0)), 4)
                   for k, v in end.items() if k.startswith("vllm_odb:")}
    summary = {
        "model": args.model, "clients": args.clients, "kv_blocks": args.kv_blocks, "completed": len(done), "aborted": len(reqs) - len(done),
        "with_stop": sum(bool(r.get("stop")) for r in reqs), "chat": sum(r["api"] == "chat" for r in reqs),
        "odb": sum(r["method"] == "odb" for r in reqs),
        "text_match": len(done) - len(mism), "usage_match": len(done) - len(usage_bad),
        "block_granular": len(done) - len(coarse),
        "bad_input_ok": sum(b["ok"] for b in bad), "bad_input_cases": len(bad),
        "running_after": end.get("vllm:num_requests_running"), "waiting_after": end.get("vllm:num_requests_waiting"),
        "kv_cache_usage": {"start": kv[1], "end": kv[2]},
        "odb_metrics": odb_metrics,
        "seconds": {"offline": round(t_offline, 1), "clients": round(t_clients, 1)},
    }
    ok = (not mism and not usage_bad and not coarse and all(b["ok"] for b in bad) and kv[1] == kv[2]
          and summary["running_after"] == 0 and odb_metrics.get("vllm_odb:requests_total", 0) > 0)
    if args.out:
        json.dump({"summary": summary, "bad": bad, "requests": reqs}, open(args.out, "w"), indent=1)
    print(json.dumps(summary))
    for r in mism[:5]:
        print("MISMATCH", json.dumps({k: r.get(k) for k in ("i", "api", "method", "stop", "expected", "got")}))
    for b in bad:
        if not b["ok"]:
            print("BAD-INPUT", json.dumps(b))
    return 0 if ok else 1

