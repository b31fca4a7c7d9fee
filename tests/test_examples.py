"""examples/ on CPU: the reference example runs; the GPU examples (offline_batch.py,
serve_and_stream.py) import without vLLM's engine, answer ``--help`` and, without a GPU, exit
non-zero with one line. test_gpu_examples.py runs those two on a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shipped import WORKED

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
GPU_EXAMPLES = ["offline_batch", "serve_and_stream"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_example_runs_on_cpu(capsys):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reference_generate.py"), "--gen-length", "32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["vanilla", "fast-dllm", "odb"]
    for line in lines:  # the basic checkpoint answers both of its suite's questions right with every method
        assert "forwards per request [" in line, line
        if not WORKED:  # (the worked suite's answers are long: the canvas of 32 holds their start)
            assert "['7+8=15, 4+3+1=8, so 85', 'a d m q']" in line, line
    # a missing checkpoint: one line naming it, exit 2 (in this process: no second interpreter start)
    try:
        code = _module("reference_generate").main(["--model", str(ROOT / "nowhere")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err


@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_gpu_example_help_and_no_gpu_message(name, capsys, monkeypatch):
    mod = _module(name)
    assert f"python examples/{name}.py" in mod.__doc__  # the docstring gives the command
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "checkpoints/tiny-llada" in out
    args = mod.parse_args([])
    assert Path(args.model) == ROOT / "checkpoints" / "tiny-llada"

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "GPU" in err[0]


def test_serve_example_command_line():
    """The server the example starts is ``vllm serve <model> --speculative odb`` with the tiny
    checkpoints' engine knobs."""
    mod = _module("serve_and_stream")
    cmd = mod.serve_command(mod.parse_args(["--port", "8123"]))
    assert cmd[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(ROOT / "checkpoints" / "tiny-llada")]
    assert cmd[5:7] == ["--speculative", "odb"]
    i = cmd.index("--additional-config")
    assert cmd[i + 1] == '{"odb": {"block_length": 32, "ridge_rows": 64}}'
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_offline_example_requests_differ_in_knobs():
    mod = _module("offline_batch")
    knobs = [k for _, k in mod.PLANS]
    assert len({str(k) for k in knobs}) == len(knobs) and knobs[0] is None
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies.config import DecodeConfig

    engine = DecodeConfig.for_method("odb", block_length=32, ridge_rows=64)
    for k in knobs:  # every request's knobs are valid on the example's engine
        request_config(engine, k, 0.0, 64)
    items = mod.prompts_for(mod.parse_args([]))
    assert len(items) == len(mod.PLANS) and all(ex is not None for _, ex in items)


class _FakeServer:
    """An OpenAI-compatible stand-in on 127.0.0.1 (an ephemeral port) for the serve example's
    client code: /health, /v1/models, /v1/chat/completions (plain and streamed in two chunks); a
    ``vllm_xargs`` knob it does not know is a 400 naming it, as the real server answers. Records
    every chat request body."""

    KNOBS = frozenset({"threshold", "method"})

    def __init__(self):
        import http.server
        import threading

        fake = self
        self.bodies: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload, content_type="application/json"):
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                                                  "owned_by": "test"}]})
                else:
                    self._send(404, {"error": {"message": "no such path"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                unknown = sorted(set(body.get("vllm_xargs") or {}) - fake.KNOBS)
                if unknown:
                    return self._send(400, {"error": {"message": f"unknown decoding knob(s) {unknown}",
                                                      "type": "BadRequestError", "code": 400}})
                head = {"id": "x", "created": 0, "model": body["model"]}
                usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
                if not body.get("stream"):
                    return self._send(200, {**head, "object": "chat.completion", "usage": usage, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "ab cd"}, "finish_reason": "stop"}]})
                events = [{**head, "object": "chat.completion.chunk", "choices": [
                    {"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in ("ab", " cd")]
                events.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                self._send(200, "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n",
                           "text/event-stream")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_serve_example_client_against_a_loopback_stand_in(capsys, monkeypatch):
    """The example's openai-client half (``--base-url``: no server started, no GPU needed) against
    the stand-in: the knobs go out in ``extra_body`` as ``vllm_xargs``, streamed chunks are joined,
    usage is read, and the misspelt knob's 400 is caught."""
    pytest.importorskip("openai")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    mod = _module("serve_and_stream")
    fake = _FakeServer()
    try:
        rc = mod.main(["--base-url", fake.base, "--json", "--startup-timeout", "30"])
    finally:
        fake.close()
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads(out.strip().splitlines()[-1])
    assert res["model"] == "tiny" and res["chat"]["text"] == res["stream"]["text"] == "ab cd"
    assert res["stream"]["chunks"] == 2 and res["stream"]["usage"]["completion_tokens"] == 4
    assert res["bad_knob"]["status"] == 400 and "thresh" in res["bad_knob"]["message"]
    xargs = [b.get("vllm_xargs") for b in fake.bodies]
    assert xargs == [{"threshold": 0.95}, {"threshold": 0.95}, {"method": "fast-dllm"}, {"thresh": 0.5}]
    assert [bool(b.get("stream")) for b in fake.bodies] == [False, True, True, False]
    assert all(b["temperature"] == 0 for b in fake.bodies[:3])
