"""Serve a checkpoint with ``vllm serve --speculative odb`` and query it with the ``openai`` client,
plain and streaming, with per-request knobs (needs a CUDA GPU).

    python examples/serve_and_stream.py                    # the shipped tiny LLaDA checkpoint
    python examples/serve_and_stream.py --model checkpoints/tiny-dream --port 8001 --json
    python examples/serve_and_stream.py --base-url http://127.0.0.1:8000/v1   # a server already up

Starts, in a subprocess of this Python (the ``vllm`` command of its environment),

    vllm serve checkpoints/tiny-llada --speculative odb --dtype float32 --max-model-len 1024 \\
        --additional-config '{"odb": {"block_length": 32, "ridge_rows": 64}}' --port 8000

waits for ``/health``, then with ``openai.OpenAI(base_url="http://127.0.0.1:8000/v1")``:

1. a chat completion with a per-request knob through ``extra_body={"vllm_xargs": {"threshold": 0.95}}``
   (``vllm_xargs`` reaches the engine as ``SamplingParams.extra_args``);
2. the same request streamed (``stream=True``): the server sends one chunk per decoded block, and
   the text is the same;
3. a streamed request that turns jump-share drafts off: ``extra_body={"vllm_xargs": {"method":
   "fast-dllm"}}``;
4. a misspelt knob (``{"thresh": 0.5}``): HTTP 400 naming it, as ``openai.BadRequestError``;

then stops the server.
``--json`` adds one JSON line with the texts, chunk counts and usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = str(Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-llada")
QUESTIONS = ["What is 47+38? Show the column sums.", "Sort these letters: q d m a"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python examples/serve_and_stream.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or model name (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--base-url", help="query this server (e.g. http://127.0.0.1:8000/v1) instead of starting one")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32, help="the engine's block (one streamed chunk each)")
    ap.add_argument("--ridge-rows", type=int, default=64, help="jump-share draft budget (engine default 251); "
                    "64 keeps a tiny checkpoint's engine small")
    ap.add_argument("--dtype", default="float32", help="float32 for the tiny checkpoints, bfloat16 for full-size ones")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--kv-cache-memory-bytes", type=int, help="a fixed KV cache instead of a share of the GPU's "
                    "free memory (vLLM's knob; lets several engines start at once on one GPU)")
    ap.add_argument("--startup-timeout", type=float, default=420, help="seconds to wait for the server")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    return ap.parse_args(argv)


def serve_command(args) -> list[str]:
    """``vllm serve ...`` as this Python runs it (``python -m vllm.entrypoints.cli.main`` is the
    ``vllm`` command)."""
    odb = {"block_length": args.block_length, "ridge_rows": args.ridge_rows}
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model, "--speculative", "odb",
            "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
            "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--seed", "0",
            "--additional-config", json.dumps({"odb": odb}), "--host", "127.0.0.1", "--port", str(args.port),
            *(["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)] if args.kv_cache_memory_bytes else [])]


def start_server(args, log_path: str) -> subprocess.Popen:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(f"error: port {args.port} is in use; pass --port or --base-url")
    cmd = serve_command(args)
    print("$ vllm " + " ".join(a if " " not in a and "{" not in a else f"'{a}'" for a in cmd[3:]), flush=True)
    with open(log_path, "w") as log:  # the server keeps its own copy of the file
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(base: str, server: subprocess.Popen | None, timeout: float, log_path: str | None) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base.removesuffix("/v1") + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if server is not None and server.poll() is not None:
            tail = Path(log_path).read_text()[-3000:] if log_path else ""
            raise SystemExit(f"{tail}\nerror: the server exited with {server.returncode} (log above)")
        time.sleep(1)
    raise SystemExit(f"error: no server at {base} after {timeout:.0f} s")


def stream(client, model: str, question: str, max_tokens: int, xargs: dict) -> dict:
    """One streamed chat completion: its text, content chunks and usage."""
    pieces, usage = [], None
    print(f"> {question}  (streamed, vllm_xargs={json.dumps(xargs)})\n  ", end="", flush=True)
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"vllm_xargs": xargs}):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                print(f"[{choice.delta.content}]", end="", flush=True)
    print(f"\n  {len(pieces)} chunks, usage {usage}")
    return {"text": "".join(pieces), "chunks": len(pieces), "usage": usage}


def run_client(base: str, args) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="EMPTY")
    model = client.models.list().data[0].id
    q = QUESTIONS[0]
    xargs = {"threshold": 0.95}
    resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                          max_tokens=args.max_tokens, temperature=0,
                                          extra_body={"vllm_xargs": xargs})
    chat = {"text": resp.choices[0].message.content, "usage": resp.usage.model_dump(),
            "finish_reason": resp.choices[0].finish_reason}
    print(f"> {q}  (vllm_xargs={json.dumps(xargs)})\n  {chat['text']!r}  usage {chat['usage']}")
    streamed = stream(client, model, q, args.max_tokens, xargs)
    plain = stream(client, model, QUESTIONS[1], args.max_tokens, {"method": "fast-dllm"})
    same = streamed["text"] == chat["text"]
    print(f"streamed text {'equals' if same else 'DIFFERS FROM'} the plain completion's")
    bad = bad_knob(client, model, args.max_tokens)
    return {"model": model, "chat": chat, "stream": streamed, "stream_fast_dllm": plain, "stream_equals_chat": same,
            "bad_knob": bad}


def bad_knob(client, model: str, max_tokens: int) -> dict:
    """A misspelt knob: the server answers 400 naming it."""
    import openai

    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                       max_tokens=max_tokens, extra_body={"vllm_xargs": {"thresh": 0.5}})
    except openai.BadRequestError as e:
        print(f"vllm_xargs={{\"thresh\": 0.5}} -> HTTP {e.status_code}: {e.message[:200]}")
        return {"status": e.status_code, "message": e.message}
    print("vllm_xargs={\"thresh\": 0.5} was accepted (expected HTTP 400)")
    return {"status": 200, "message": ""}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.base_url is None and not torch.cuda.is_available():
        print("error: serve_and_stream.py starts vLLM and needs a CUDA GPU (or --base-url of a running server)",
              file=sys.stderr)
        return 1
    server, log_path = None, None
    base = args.base_url or f"http://127.0.0.1:{args.port}/v1"
    try:
        if args.base_url is None:
            log_path = os.path.join(tempfile.mkdtemp(prefix="vllm-odb-serve-"), "server.log")
            server = start_server(args, log_path)
            print(f"server log: {log_path}", flush=True)
        wait_ready(base, server, args.startup_timeout, log_path)
        result = run_client(base, args)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    if args.json:
        print(json.dumps(result))
    return 0 if result["stream_equals_chat"] and result["bad_knob"]["status"] == 400 else 1


if __name__ == "__main__":
    sys.exit(main())
