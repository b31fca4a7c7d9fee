"""The server harnesses' shared parsing (vllm_odb/bench/serving.py) on CPU: Prometheus text as
vLLM 0.26's ``/metrics`` writes it (a sample written by hand in prometheus_client's format, with
the metric and label names of vllm/v1/metrics/loggers.py; the GPU runs keep the real text in their
reports), server-sent events, error objects, percentiles, the serve command."""

from __future__ import annotations

import json

import pytest

from vllm_odb.bench import serving

METRICS = r'''# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="checkpoints/tiny-llada"} 0.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="checkpoints/tiny-llada"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="checkpoints/tiny-llada"} 0.0625
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="False",engine="0",gpu_memory_utilization="0.3",num_cpu_blocks="None",num_gpu_blocks="4096",num_gpu_blocks_override="None"} 1.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="checkpoints/tiny-llada"} 712.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="checkpoints/tiny-llada"} 38.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="checkpoints/tiny-llada"} 250.0
vllm:request_success_total{engine="0",finished_reason="error",model_name="checkpoints/tiny-llada"} 2.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="checkpoints/tiny-llada"} 1.7337e+09
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="checkpoints/tiny-llada"} 12.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="checkpoints/tiny-llada"} 1002.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="checkpoints/tiny-llada"} 1002.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="checkpoints/tiny-llada"} 812.5
odd_label{path="a \"quoted\" \\ value, with comma"} 7 1733700000000
vllm_odb:forwards_total 5120.0
this line is not a sample
'''


def test_metrics_parse_names_labels_and_values():
    samples = serving.parse_metrics(METRICS)
    assert serving.metric(samples, "vllm:num_requests_running") == 0.0
    assert serving.requests_in_flight(samples) == (0.0, 3.0)
    assert serving.metric(samples, "vllm:request_success_total") == 1002.0
    assert serving.metric(samples, "vllm:request_success_total", finished_reason="error") == 2.0
    assert serving.metric(samples, "vllm:e2e_request_latency_seconds_bucket", le="+Inf") == 1002.0
    assert serving.metric(samples, "vllm_odb:forwards_total") == 5120.0
    assert serving.metric(samples, "vllm:nothing") is None
    (odd,) = [s for s in samples if s.name == "odd_label"]
    assert odd.labels == {"path": 'a "quoted" \\ value, with comma'} and odd.value == 7.0


def test_kv_blocks_and_finish_reasons():
    samples = serving.parse_metrics(METRICS)
    assert serving.kv_blocks(samples) == {"usage": 0.0625, "num_gpu_blocks": 4096, "free_blocks": 3840}
    assert serving.finished_by_reason(samples) == {"stop": 712.0, "length": 38.0, "abort": 250.0, "error": 2.0}
    assert serving.kv_blocks([]) == {"usage": None, "num_gpu_blocks": None, "free_blocks": None}


def test_server_sent_events():
    assert serving.sse_data("data: [DONE]") == "[DONE]"
    assert serving.sse_data(": keep-alive") is None and serving.sse_data("") is None
    chunk = {"choices": [{"index": 0, "text": "ab", "finish_reason": None}]}
    assert serving.sse_data("data: " + json.dumps(chunk)) == chunk
    assert serving.stream_text(chunk, "completions") == "ab"
    assert serving.stream_text({"choices": [{"delta": {"content": "cd"}}]}, "chat") == "cd"
    assert serving.stream_text({"choices": [{"delta": {"role": "assistant"}}]}, "chat") == ""
    assert serving.sse_data("data: {broken")["_unparsed"] == "{broken"


def test_error_codes():
    assert serving.error_code({"error": {"message": "x", "type": "BadRequestError", "code": 400}}) == 400
    assert serving.error_code({"error": {"message": "x", "type": "InternalServerError", "code": 500}}) == 500
    assert serving.error_code({"object": "error", "message": "x", "code": 404}) == 404
    assert serving.error_code({"error": {"message": "no code"}}) == 500
    assert serving.error_code({"choices": []}) is None and serving.error_code("[DONE]") is None


def test_percentiles():
    assert serving.percentile([], 50) is None
    assert serving.percentile([3.0], 99) == 3.0
    xs = [float(x) for x in range(1, 101)]
    assert serving.percentile(xs, 50) == 50.5
    assert serving.percentile(xs, 0) == 1.0 and serving.percentile(xs, 100) == 100.0
    assert abs(serving.percentile(xs, 99) - 99.01) < 1e-9


def test_serve_command():
    cmd = serving.serve_command("checkpoints/tiny-dream", 8123, True, ["--enforce-eager"])
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--speculative") + 1] == "odb" and cmd[-1] == "--enforce-eager"
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"odb": {"block_length": 16, "gen_length": 64,
                                                                             "ridge_rows": 64}}
    plain = serving.serve_command("checkpoints/tiny-llada", 8123, False)
    assert "--speculative" not in plain and "ridge_rows" not in plain[plain.index("--additional-config") + 1]
    assert serving.Server(cmd=plain).url == "http://127.0.0.1:8123"


def test_memory_settings_third_of_the_gpu_or_a_fixed_kv_cache(monkeypatch):
    """By default a harness engine asks for 30% of the GPU; with VLLM_ODB_BENCH_KV_GIB it reserves
    that KV cache (no memory profiling, so several can start at once) on both vLLM entry points."""
    monkeypatch.delenv(serving.KV_GIB_ENV, raising=False)
    assert serving.memory_kwargs() == {"gpu_memory_utilization": 0.3}
    assert serving.memory_kwargs(0.28) == {"gpu_memory_utilization": 0.28}
    assert serving.memory_flags() == ["--gpu-memory-utilization", "0.3"]
    monkeypatch.setenv(serving.KV_GIB_ENV, "1.5")
    assert serving.memory_kwargs() == {"gpu_memory_utilization": 0.05, "kv_cache_memory_bytes": 1610612736}
    cmd = serving.serve_command("m", 9000, False)
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == "1610612736"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.05"
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv(serving.KV_GIB_ENV, bad)
        with pytest.raises(ValueError, match=serving.KV_GIB_ENV):
            serving.memory_kwargs()
