"""What the server harnesses share (``bench server-fuzz``, ``server-soak``, ``server-faults``): a
loopback ``vllm serve`` of a tiny checkpoint, started here or attached to (``--url``), its
``/health`` and ``/metrics``, server-sent events, latency percentiles.

The parsing helpers are pure (tests/test_bench_serving.py runs them on captured text); starting a
server needs a GPU. Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

# The loopback check's engine (bench/loopback.py): block 16, canvas 64. The draft budget fixes a
# jump-share engine's canvas; 64 keeps the tiny engines small (see bench/loopback.py).
BLOCK, GEN, RIDGE_ROWS = 16, 64, 64
MAX_MODEL_LEN = 512
# Several harnesses on one GPU at once: vLLM sizes its KV cache by profiling the device's free
# memory, which engines starting beside it disturb (a parity wave once saw "Available KV cache
# memory: -14.74 GiB"). With this set (GiB), every harness engine reserves that fixed KV cache and
# skips the profiling (vLLM's kv_cache_memory_bytes), asking only 5% of the GPU to be free.
KV_GIB_ENV = "VLLM_ODB_BENCH_KV_GIB"


def memory_kwargs(fraction: float = 0.3) -> dict:
    """``LLM(...)`` memory arguments of a harness engine: ``fraction`` of the GPU, or the fixed KV
    cache that ``$VLLM_ODB_BENCH_KV_GIB`` asks for."""
    gib = os.environ.get(KV_GIB_ENV, "").strip()
    if not gib:
        return {"gpu_memory_utilization": fraction}
    try:
        size = float(gib)
    except ValueError:
        size = -1.0
    if size <= 0:
        raise ValueError(f"{KV_GIB_ENV}={gib!r}: give the KV cache size in GiB, a positive number")
    return {"gpu_memory_utilization": 0.05, "kv_cache_memory_bytes": int(size * 2**30)}


def memory_flags(fraction: float = 0.3) -> list[str]:
    """The same as ``vllm serve`` flags."""
    return [x for k, v in memory_kwargs(fraction).items() for x in (f"--{k.replace('_', '-')}", str(v))]


def engine_section(speculative: bool) -> dict:
    """``--additional-config``'s ``odb`` section the harnesses serve with."""
    return {"block_length": BLOCK, "gen_length": GEN, **({"ridge_rows": RIDGE_ROWS} if speculative else {})}


def serve_command(model: str, port: int, speculative: bool, extra: list[str] | None = None) -> list[str]:
    """``vllm serve`` of ``model`` on 127.0.0.1:``port`` (fp32, a third of the GPU), with
    ``--speculative odb`` or the default engine."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
           *memory_flags(), "--seed", "0",
           "--additional-config", json.dumps({"odb": engine_section(speculative)})]
    if speculative:
        cmd += ["--speculative", "odb"]
    return cmd + list(extra or [])


def prepare_out(path: str | None) -> None:
    """Make the report's directory now, not after the run."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answered (refused, reset, timed out)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, TimeoutError):
        return 0, ""


class Server:
    """A ``vllm serve`` subprocess (its own process group, log to ``log_path``), or an attached
    server (``url``): ``with Server(...) as s:`` waits until ``/health`` answers 200."""

    def __init__(self, cmd: list[str] | None = None, url: str | None = None, env: dict | None = None,
                 log_path: str | None = None, start_timeout: float = 600.0):
        if (cmd is None) == (url is None):
            raise ValueError("Server: give the command to start, or the url of a running server")
        self.cmd, self.env, self.start_timeout = cmd, env, start_timeout
        self.log_path = log_path or os.environ.get("SERVER_LOG", "/tmp/vllm-odb-server.log")
        self.proc: subprocess.Popen | None = None
        if url is None:
            port = cmd[cmd.index("--port") + 1]
            url = f"http://127.0.0.1:{port}"
        self.url = url.rstrip("/")

    def __enter__(self) -> "Server":
        if self.cmd is not None:
            log = open(self.log_path, "w")
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(self.env or {})})
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if get(f"{self.url}/health", timeout=2)[0] == 200:
                return self
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before answering /health "
                                   f"(log: {self.log_path})")
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout:.0f}s (log: {self.log_path})")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self, lines: int = 80) -> list[str]:
        """The last ``lines`` lines of the server's log (a started server's), for a report."""
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read().splitlines()[-lines:]
        except OSError:
            return []

    def model_name(self) -> str:
        return json.loads(get(f"{self.url}/v1/models")[1])["data"][0]["id"]

    def metrics(self) -> list["Sample"]:
        status, text = get(f"{self.url}/metrics", timeout=30)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_metrics(text)


# ---- /metrics ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict = field(hash=False)
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?\s*$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus' text format -> its samples (comments and malformed lines skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(3) or "")}
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append(Sample(m.group(1), labels, value))
    return out


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def metric(samples: list[Sample], name: str, **labels) -> float | None:
    """Sum of ``name``'s samples whose labels include ``labels``; None when there is none."""
    hits = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(hits) if hits else None


def kv_blocks(samples: list[Sample]) -> dict:
    """The KV cache as /metrics shows it: the usage fraction (``vllm:kv_cache_usage_perc``, 0..1),
    the pool size (``vllm:cache_config_info``'s ``num_gpu_blocks`` label) and the blocks free."""
    usage = metric(samples, "vllm:kv_cache_usage_perc")
    info = [s for s in samples if s.name == "vllm:cache_config_info"]
    total = None
    if info and info[0].labels.get("num_gpu_blocks", "").isdigit():
        total = int(info[0].labels["num_gpu_blocks"])
    free = None if usage is None or total is None else round(total * (1.0 - usage))
    return {"usage": usage, "num_gpu_blocks": total, "free_blocks": free}


def requests_in_flight(samples: list[Sample]) -> tuple[float | None, float | None]:
    return metric(samples, "vllm:num_requests_running"), metric(samples, "vllm:num_requests_waiting")


def finished_by_reason(samples: list[Sample]) -> dict[str, float]:
    """``vllm:request_success_total`` per ``finished_reason`` (stop, length, abort, error, ...)."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == "vllm:request_success_total":
            reason = s.labels.get("finished_reason", "?")
            out[reason] = out.get(reason, 0.0) + s.value
    return out


# ---- streams -----------------------------------------------------------------------------------
def sse_data(line: str):
    """One line of a server-sent event stream -> its JSON payload, ``"[DONE]"``, or None (not data)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return payload
    try:
        return json.loads(payload)
    except ValueError:
        return {"_unparsed": payload[:200]}


def error_code(payload) -> int | None:
    """The HTTP-style code of an error object (vLLM's ``{"error": {"code": 400, ...}}``, or a bare
    ``{"code": ..., "object": "error"}``), else None."""
    if not isinstance(payload, dict):
        return None
    err = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    if err is payload and payload.get("object") != "error":
        return None
    code = err.get("code")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    return code if isinstance(code, int) else 500


def stream_text(payload, api: str) -> str:
    """The text a completions / chat stream chunk carries."""
    if not isinstance(payload, dict):
        return ""
    parts = []
    for c in payload.get("choices") or []:
        piece = c.get("text") if api == "completions" else (c.get("delta") or {}).get("content")
        if piece:
            parts.append(piece)
    return "".join(parts)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
