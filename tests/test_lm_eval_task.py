"""The ``odb_suite`` lm-eval task (vllm_odb/eval) on CPU: lm-eval's own task loading gives the
documents, prompt and metric of ``python -m vllm_odb.bench quality``, and lm-eval driven end to
end with the ``odb-reference`` model (the reference engine) scores what ``bench quality`` scores
on the same prompts. No server and no network (the GPU test against ``vllm serve`` is
test_gpu_lm_eval.py). Skipped without lm-eval (``pip install -e '.[eval]'``)."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_odb.eval import TASK, include_path, suite_task
from vllm_odb.tiny import suites

lm_eval = pytest.importorskip("lm_eval")
ROOT = Path(__file__).resolve().parents[1]
LLADA = str(ROOT / "checkpoints" / "tiny-llada")


def _task_manager(metadata: dict):
    """lm-eval's task index over our include path only (its own ~10k task files take seconds to
    scan and are not needed here)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path(), include_defaults=False, metadata=metadata)


def _load(metadata: dict | None = None):
    return _task_manager(metadata or {}).load([TASK])["tasks"][TASK]


def _predictions(ex, rng) -> list[str]:
    """Right, reworded (worked suite), truncated, padded, wrong and empty answers."""
    out = [ex.answer, f"  {ex.answer}\n", ex.answer[:-1], ex.answer + " 1", "", "nonsense"]
    if hasattr(ex, "render"):
        out += [ex.render(rng) for _ in range(3)]
        out.append(ex.answer.replace("The answer is", "The answer is 1"))
    return out


@pytest.mark.parametrize("suite,seed", [("basic", 0), ("basic", 5), ("worked", 1)])
def test_documents_prompt_and_metric_are_bench_quality_s(suite, seed):
    """lm-eval's documents are ``bench quality --seed S``'s suite (its first N for ``--limit N``),
    the prompt is the suite's prompt, and the task's metric on right and wrong answers is the
    suite's verifier (accuracy = ``steps``, final_accuracy = ``final``), as quality scores it."""
    task = _load({"suite": suite, "suite_seed": seed, "suite_size": 40})
    docs = list(task.test_docs())
    module = suites.get(suite)
    examples = module.make_suite(seed, 40)
    assert len(docs) == 40
    for n in (1, 7, 40):  # --limit n: lm-eval takes the first n documents
        assert [d["prompt"] for d in docs[:n]] == [e.prompt for e in module.make_suite(seed, n)]
    rng = random.Random(0)
    right = wrong = 0
    for doc, ex in zip(docs[:12], examples):
        assert (doc["task"], doc["prompt"], doc["answer"]) == (ex.task, ex.prompt, ex.answer)
        assert task.doc_to_text(doc) == ex.prompt
        for pred in _predictions(ex, rng):
            verdict = module.check(pred, ex)
            got = task.process_results(doc, [pred])
            assert got == {"accuracy": float(verdict["steps"]), "final_accuracy": float(verdict["final"])}, pred
            right += verdict["steps"]
            wrong += not verdict["steps"]
    assert right and wrong
    assert task.config.output_type == "generate_until"
    assert task.config.generation_kwargs["until"] == [] and task.config.generation_kwargs["max_gen_toks"] == 64


def test_suite_follows_the_checkpoint(tmp_path):
    """Without ``suite``, the documents come from the suite the checkpoint (``checkpoint``, or
    lm-eval's model argument when it is a directory) was trained on; bad names are one-line
    errors."""
    worked = tmp_path / "ckpt"
    worked.mkdir()
    (worked / "training_log.json").write_text(json.dumps({"args": {"suite": "worked"}}))
    assert suite_task.resolve_suite(checkpoint=str(worked)) == "worked"
    assert suite_task.resolve_suite(model=str(worked)) == "worked"
    assert suite_task.resolve_suite(model=LLADA) == suites.suite_name(LLADA)  # the shipped checkpoint's own
    assert suite_task.resolve_suite() == "basic"
    assert suite_task.resolve_suite(suite="worked", model=LLADA) == "worked"
    assert suite_task.resolve_suite(model="some-served-name") == "basic"
    docs = suite_task.suite_docs(model=str(worked), suite_size=3, version=1.0, base_url="http://127.0.0.1:1")
    assert [d["prompt"] for d in docs] == [e.prompt for e in suites.get("worked").make_suite(0, 3)]
    with pytest.raises(ValueError, match="suite"):
        suite_task.suite_docs(suite="nope")
    with pytest.raises(ValueError, match="checkpoint"):
        suite_task.suite_docs(checkpoint=str(tmp_path / "missing"))
    tasks = suite_task.suite_docs(suite_tasks="add,sort", suite_size=4)
    assert [d["task"] for d in tasks] == ["add", "sort", "add", "sort"]


def test_include_path_helper():
    out = subprocess.run([sys.executable, "-m", "vllm_odb.eval", "--print-include-path"], cwd=ROOT, check=False,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == include_path()
    assert (Path(out.stdout.strip()) / "odb_suite.yaml").is_file()


def _quality(limit: int, gen: int, block: int, method: str) -> dict:
    from vllm_odb.bench.quality import add_arguments, run_quality

    ap = argparse.ArgumentParser()
    add_arguments(ap)
    args = ap.parse_args(["--model", LLADA, "--method", method, "--limit", str(limit), "--seed", "0",
                          "--gen-length", str(gen), "--block-length", str(block), "--device", "cpu"])
    return run_quality(args)


@pytest.mark.slow
def test_lm_eval_end_to_end_with_the_reference_engine_scores_like_bench_quality():
    """lm-eval's simple_evaluate with ``odb-reference`` (the reference engine on CPU) on 5 prompts,
    gen length 16 (long answers get cut, so some are wrong): its accuracy, final accuracy and
    every answer equal ``bench quality --limit 5 --gen-length 16 --block-length 16``'s, and the
    context it built is the checkpoint's chat template around the suite's prompt."""
    from lm_eval import simple_evaluate

    import vllm_odb.eval.reference_lm  # noqa: F401  registers odb-reference
    from vllm_odb.reference.loader import load_tokenizer

    limit, gen = 5, 16
    out = simple_evaluate(model="odb-reference", model_args={"pretrained": LLADA, "method": "odb", "block_length": gen},
                          tasks=[TASK], limit=limit, apply_chat_template=True, batch_size=32, device="cpu",
                          gen_kwargs={"max_gen_toks": gen}, log_samples=True,
                          task_manager=_task_manager({"suite_seed": 0}))
    ours = _quality(limit, gen, gen, "odb")
    res = out["results"][TASK]
    assert res["accuracy,none"] == ours["accuracy"]
    assert res["final_accuracy,none"] == ours["final_accuracy"]
    assert 0 < ours["accuracy"] < 1  # some right, some wrong: the comparison means something
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [s["output"] for s in ours["samples"]]
    tok = load_tokenizer(LLADA)
    for s in samples:
        context = s["arguments"]["gen_args_0"]["arg_0"] if isinstance(s["arguments"], dict) else s["arguments"][0][0]
        assert context == tok.apply_chat_template([{"role": "user", "content": s["doc"]["prompt"]}],
                                                  add_generation_prompt=True, tokenize=False)


def test_in_process_vllm_model_can_read_our_config_and_pass_knobs():
    """lm-eval's ``--model vllm`` calls ``transformers.AutoConfig.from_pretrained(pretrained)``
    right after it built ``LLM(...)``: without remote code that only works for LLaDA and Dream
    because vLLM, loading the config through our plugin, registers our config classes with
    transformers. And the ``SamplingParams`` it builds from the task's and ``--gen_kwargs``'
    generation arguments pass the plugin's request validation, carrying ``extra_args`` (the
    knobs) and ``skip_special_tokens``. Checked here without a GPU."""
    pytest.importorskip("vllm")
    import types

    from lm_eval.models.vllm_causallms import VLLM
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.transformers_utils.config import get_config

    import vllm_odb
    from vllm_odb.engine.knobs import engine_config
    from vllm_odb.models.configs import DreamConfig, LLaDAConfig

    vllm_odb.register()
    for fmt, cls in (("llada", LLaDAConfig), ("dream", DreamConfig)):
        path = str(ROOT / "checkpoints" / f"tiny-{fmt}")
        get_config(path, trust_remote_code=False)  # what LLM(...) does in lm-eval's process
        assert isinstance(AutoConfig.from_pretrained(path, trust_remote_code=False), cls)

    task_kwargs = dict(_load().config.generation_kwargs)
    gen = task_kwargs | {"skip_special_tokens": True, "extra_args": {"method": "fast-dllm", "threshold": 0.8}}
    kwargs, until, max_gen_toks = VLLM.modify_gen_kwargs(gen, eos="<|endoftext|>")
    params = SamplingParams(max_tokens=max_gen_toks, stop=until, **kwargs)  # as lm-eval's generate_until
    cfg = LLaDAConfig.from_pretrained(LLADA)
    engine = engine_config({"odb": {"block_length": 32}})
    cfg.odb_engine = {k: getattr(engine, k) for k in engine.__dataclass_fields__}
    params._validate_diffusion(types.SimpleNamespace(is_diffusion=True, hf_config=cfg))
    assert params.max_tokens == 64 and params.temperature == 0 and params.skip_special_tokens
    assert params.extra_args == {"method": "fast-dllm", "threshold": 0.8} and params.stop == ["<|endoftext|>"]


class _ReferenceServer:
    """A loopback stand-in for ``vllm serve`` (127.0.0.1, an ephemeral port) answering
    /v1/chat/completions and /v1/completions with the reference engine through ``odb-reference``
    (block 16; ``vllm_xargs`` as per-request knobs, ``stop`` strings as end markers): it checks
    lm-eval's side of the protocol (what the API models send and how they read answers) without a
    GPU. Chat renders the checkpoint's template as vLLM does; completions take token ids. Records
    every request body."""

    def __init__(self, lm):
        import http.server
        import threading

        owner, self.bodies = self, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                text = owner.answer(self.path, body)
                key = "message" if self.path.endswith("/chat/completions") else "text"
                choice = {"index": 0, "finish_reason": "stop",
                          key: {"role": "assistant", "content": text} if key == "message" else text}
                data = json.dumps({"id": "x", "object": "x", "created": 0, "model": body["model"],
                                   "choices": [choice]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.lm = lm
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str, body: dict) -> str:
        tok = self.lm.ckpt.tokenizer
        if path.endswith("/chat/completions"):
            context = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        else:
            (ids,) = body["prompt"]  # one request of token ids (lm-eval's batch of 1)
            context = tok.decode(ids)
            assert tok(context, add_special_tokens=False)["input_ids"] == ids
        gen = {"max_gen_toks": body["max_tokens"], "until": body.get("stop") or [],
               "temperature": body.get("temperature"), "extra_args": body.get("vllm_xargs")}
        return self.lm._decode([context], gen)[0]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def reference_server():
    from vllm_odb.eval.reference_lm import ReferenceLM

    server = _ReferenceServer(ReferenceLM(pretrained=LLADA, method="fast-dllm", block_length=16, device="cpu"))
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("api", ["local-chat-completions", "local-completions"])
def test_lm_eval_api_models_against_a_loopback_stand_in(api, reference_server, monkeypatch):
    """lm-eval's ``local-chat-completions`` / ``local-completions`` (the models the README runs
    against ``vllm serve``) on 5 prompts against the reference stand-in: they send the suite's
    prompt (as the chat's user turn, or as the chat template's token ids with no second BOS),
    ``max_tokens`` = the task's ``max_gen_toks``, temperature 0, ``vllm_xargs`` from
    ``--gen_kwargs``, and no stop string but the tokenizer's EOS (completions); the score equals
    ``bench quality``'s for the method ``vllm_xargs`` picks."""
    from lm_eval import simple_evaluate

    from vllm_odb.reference.loader import load_checkpoint

    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    limit, gen = 5, 16
    srv = reference_server
    srv.bodies.clear()
    chat = api == "local-chat-completions"
    args = {"model": LLADA, "base_url": f"{srv.base}/{'chat/completions' if chat else 'completions'}",
            "max_retries": 1}
    if not chat:
        args |= {"tokenizer_backend": "huggingface", "tokenized_requests": True}
    out = simple_evaluate(model=api, model_args=args, tasks=[TASK], limit=limit, apply_chat_template=True,
                          gen_kwargs={"max_gen_toks": gen, "vllm_xargs": {"method": "odb"}}, log_samples=True,
                          task_manager=_task_manager({"suite_seed": 0}))
    ours = _quality(limit, gen, gen, "odb")
    res = out["results"][TASK]
    assert (res["accuracy,none"], res["final_accuracy,none"]) == (ours["accuracy"], ours["final_accuracy"])
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [s["output"] for s in ours["samples"]]
    ck = load_checkpoint(LLADA)
    prompts = [e.prompt for e in suites.get("basic").make_suite(0, limit)]
    bodies = sorted(srv.bodies, key=lambda b: prompts.index(b["messages"][0]["content"]) if chat
                    else [ck.encode_chat(p) for p in prompts].index(b["prompt"][0]))
    assert len(bodies) == limit
    for body, prompt in zip(bodies, prompts):
        if chat:
            assert body["messages"] == [{"role": "user", "content": prompt}] and body["stop"] == []
        else:
            assert body["prompt"] == [ck.encode_chat(prompt)] and body["stop"] == [ck.tokenizer.eos_token]
        assert body["max_tokens"] == gen and body["temperature"] == 0 and body["vllm_xargs"] == {"method": "odb"}
        assert body["seed"] == 1234  # always sent: the server must take it (test_the_server_takes_the_seed...)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_the_server_takes_the_seed_lm_eval_sends(api):
    """lm-eval's API models send ``"seed": 1234`` with every request (it cannot be left out). The
    plugin's request validation (patches/diffusion_params.py) takes it on greedy requests, where
    it changes nothing, and drops it; a sampling request with a seed is still refused by name."""
    pytest.importorskip("vllm")
    import types

    import vllm.plugins
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from vllm_odb.engine.knobs import engine_config
    from vllm_odb.models.configs import LLaDAConfig

    vllm.plugins.load_general_plugins()
    cfg = LLaDAConfig.from_pretrained(LLADA)
    engine = engine_config({"odb": {"block_length": 32}})
    cfg.odb_engine = {k: getattr(engine, k) for k in engine.__dataclass_fields__}
    model_config = types.SimpleNamespace(is_diffusion=True, hf_config=cfg)

    def params(temperature: float):
        body = {"model": "m", "max_tokens": 64, "temperature": temperature, "stop": [], "seed": 1234,
                "vllm_xargs": {"method": "fast-dllm"}}
        if api == "chat":
            return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **body).to_sampling_params(64, {})
        return CompletionRequest(prompt=[[1, 2, 3]], **body).to_sampling_params(64, None)

    greedy = params(0.0)
    assert greedy.seed == 1234
    greedy._validate_diffusion(model_config)
    assert greedy.seed is None and greedy.extra_args == {"method": "fast-dllm"}
    with pytest.raises(ValueError, match=r"\bseed\b"):
        params(0.7)._validate_diffusion(model_config)


def test_reference_model_knobs_are_defaults_a_request_may_leave():
    """``odb-reference``'s model knobs act as an engine's do on the server: a request's own knobs win,
    and a default its method ignores (``ridge_rows`` under ``fast-dllm``) is left out, not refused."""
    pytest.importorskip("lm_eval")
    import types

    from vllm_odb.eval.reference_lm import ReferenceLM

    model = types.SimpleNamespace(knobs={"ridge_rows": 64, "threshold": 0.8}, method="odb", block_length=32)
    plain = ReferenceLM.config(model, {"max_gen_toks": 64, "extra_args": {"method": "fast-dllm"}})
    assert not plain.jump and plain.threshold == 0.8 and plain.gen_length == 64
    jump = ReferenceLM.config(model, {"max_gen_toks": 40, "extra_args": {"threshold": 0.95}})
    assert jump.jump and jump.ridge_rows == 64 and jump.threshold == 0.95 and jump.gen_length == 64
