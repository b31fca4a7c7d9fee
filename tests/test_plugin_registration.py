"""The vLLM plugin's registration (CPU): the entry point, the architectures, config classes and config
hook it registers, the version-checked patches it applies, once."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

pytest.importorskip("vllm")

import vllm  # noqa: E402
from vllm import SamplingParams  # noqa: E402

import vllm_odb  # noqa: E402
from vllm_odb import patches  # noqa: E402
from vllm_odb.models.configs import DreamConfig, LLaDAConfig  # noqa: E402
from vllm_odb.models.hook import ODBConfigHook  # noqa: E402
from vllm_plugin_common import ARCHS, plugins_loaded  # noqa: E402,F401


# ---------------------------------------------------------------------------------------------
# Entry point and registration
# ---------------------------------------------------------------------------------------------


def test_entry_point_is_declared():
    eps = [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "odb"]
    assert len(eps) == 1
    assert eps[0].value == "vllm_odb:register"
    assert eps[0].load() is vllm_odb.register


def test_load_general_plugins_registers_both_architectures():
    supported = set(vllm.ModelRegistry.get_supported_archs())
    assert set(ARCHS) <= supported


@pytest.mark.parametrize("arch", ARCHS)
def test_registered_architecture_points_at_our_class(arch):
    target = vllm.ModelRegistry.models[arch]
    module, cls = vllm_odb.ARCHITECTURES[arch].split(":")
    assert (target.module_name, target.class_name) == (module, cls)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_hook_registered(arch):
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    assert MODELS_CONFIG_MAP[arch] is ODBConfigHook


@pytest.mark.parametrize("model_type, cls", [("llada", LLaDAConfig), ("Dream", DreamConfig)])
def test_config_classes_registered(model_type, cls):
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    assert _CONFIG_REGISTRY[model_type] is cls


def test_patches_applied():
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    assert getattr(SamplingParams._validate_diffusion, "_odb_patched", False)
    assert getattr(Scheduler.__init__, "_odb_patched", False)
    assert getattr(Scheduler.update_from_output, "_odb_patched", False)
    assert getattr(GPUModelRunner.initialize_kv_cache, "_odb_patched", False)
    from vllm.v1.worker import gpu_worker

    assert getattr(gpu_worker.warmup_kernels, "_odb_patched", False)
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    assert getattr(OpenAIServingCompletion.completion_stream_generator, "_odb_patched", False)
    for cls in (CompletionRequest, ChatCompletionRequest):
        assert getattr(cls.__pydantic_decorators__.model_validators["__log_extra_fields__"].func, "_odb_patched", False)


@pytest.mark.parametrize("body", [["checkpoints/tiny-llada", "hi"], 42, "Sort these letters: c b a", None, True])
def test_a_body_that_is_not_an_object_is_a_validation_error(body):
    """vLLM 0.26's request validators call ``data.get`` on the raw body: an AttributeError (HTTP
    500, the connection dropped) for a JSON array, number or string. With patches/request_body.py
    it is a pydantic validation error naming the body's type (HTTP 400), through a TypeAdapter as
    FastAPI builds one for the route; objects validate as before."""
    import pydantic
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for cls in (CompletionRequest, ChatCompletionRequest):
        with pytest.raises(pydantic.ValidationError, match=f"must be a JSON object, not {type(body).__name__}"):
            pydantic.TypeAdapter(cls).validate_python(body, from_attributes=True)
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "vllm_xargs": {"method": "odb"}})
    assert ok.prompt == "hi" and ok.vllm_xargs == {"method": "odb"}
    assert CompletionRequest.model_validate(ok) == ok  # a model instance validates as before
    with pytest.raises(pydantic.ValidationError, match="cache_salt"):  # vLLM's own checks still run
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "cache_salt": ""})


def _output(finish_reason, text=""):
    import types

    return types.SimpleNamespace(outputs=[types.SimpleNamespace(finish_reason=finish_reason, text=text, index=0)])


def test_a_completion_stream_failing_before_its_first_token_sends_an_error_event():
    """vLLM 0.26's completions stream skips an output with no text and no earlier tokens before it
    checks ``finish_reason="error"``: a diffusion request that failed before its first block was
    an empty 200 stream. patches/stream_errors.py raises GenerationError at it (the generator's
    error event), for our models only; a good stream passes through unchanged."""
    import asyncio
    import types

    from vllm.entrypoints.openai.engine.protocol import GenerationError

    from vllm_odb.patches import stream_errors

    async def results(*outs):
        for o in outs:
            yield 0, o

    seen = {}

    async def original(self, request, engine_inputs, result_generator, request_id, *rest):
        got = []
        try:
            async for _, res in result_generator:
                got.append(res.outputs[0].finish_reason)
        except GenerationError as e:
            got.append(f"error event: {e}")
        seen[request_id] = got
        yield "data: [DONE]"

    gen = stream_errors.wrap(original)
    ours = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(odb_engine={})))
    other = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace()))

    async def drain(server, request_id, *outs):
        return [x async for x in gen(server, None, [], results(*outs), request_id, 0, "m", 1, None, None)]

    asyncio.run(drain(ours, "failed", _output(None), _output("error")))
    asyncio.run(drain(ours, "good", _output(None, "a"), _output("stop", "b")))
    asyncio.run(drain(other, "other", _output(None), _output("error")))
    assert seen["failed"] == [None, "error event: Internal server error"]
    assert seen["good"] == [None, "stop"]
    assert seen["other"] == [None, "error"]  # another model: vLLM's code as it was


def test_runner_patch_hands_block_tables_to_our_model_state_only():
    import types

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from vllm_odb.patches import runner_block_tables

    patched = GPUModelRunner.initialize_kv_cache
    runner_block_tables.apply()  # a second apply does not wrap again
    assert GPUModelRunner.initialize_kv_cache is patched
    calls, got = [], []
    wrapped = runner_block_tables.wrap(lambda runner, cfg: calls.append(cfg))
    tables = object()
    for state in (types.SimpleNamespace(attach_block_tables=got.append), types.SimpleNamespace()):
        wrapped(types.SimpleNamespace(model_state=state, block_tables=tables), "cfg")
    assert calls == ["cfg", "cfg"]  # vLLM's own body always runs
    assert got == [tables]  # and only our model state is handed the tables


def test_register_is_idempotent(monkeypatch):
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.core.sched.scheduler import Scheduler

    def snapshot():
        return (SamplingParams._validate_diffusion, Scheduler.__init__,
                [vllm.ModelRegistry.models[a] for a in ARCHS], [MODELS_CONFIG_MAP[a] for a in ARCHS])

    before = snapshot()
    vllm_odb.register()
    assert snapshot() == before
    # Even a second full pass (a fresh module flag) must not wrap the patched functions twice.
    monkeypatch.setattr(vllm_odb, "_registered", False)
    vllm_odb.register()
    assert snapshot() == before


def test_patch_apply_twice_does_not_rewrap():
    from vllm_odb.patches import diffusion_params, scheduler_lookahead
    from vllm.v1.core.sched.scheduler import Scheduler

    validate, init = SamplingParams._validate_diffusion, Scheduler.__init__
    diffusion_params.apply()
    scheduler_lookahead.apply()
    assert SamplingParams._validate_diffusion is validate
    assert Scheduler.__init__ is init

# ---------------------------------------------------------------------------------------------
# Version check
# ---------------------------------------------------------------------------------------------


def test_version_check_refuses_other_versions():
    with pytest.raises(RuntimeError) as e:
        patches.check_vllm_version("0.25.1")
    assert "0.25.1" in str(e.value) and "0.26.0" in str(e.value)


def test_version_check_accepts_supported():
    patches.check_vllm_version("0.26.0")
    patches.check_vllm_version()  # the installed one


def test_apply_all_refuses_other_versions(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.25.1")
    with pytest.raises(RuntimeError, match=re.escape("0.25.1")):
        patches.apply_all()


def _warmup_like(prompt_len: int):
    """A stand-in for vLLM 0.26's ``warmup_kernels``: new requests named ``_warmup_i_`` with
    prompt ids ``range(prompt_len)`` (as vLLM's are), handed to the worker's execute_model."""
    from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput

    def warmup_kernels(model_runner, execute_model, sample_tokens):
        ids = list(range(prompt_len))
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = [
            NewRequestData(req_id=f"_warmup_{i}_", prompt_token_ids=ids, mm_features=[], sampling_params=None,
                           pooling_params=None, block_ids=([],), num_computed_tokens=0, lora_request=None,
                           prefill_token_ids=ids)
            for i in range(2)]
        execute_model(out)

    return warmup_kernels


@pytest.mark.parametrize("ours", [True, False])
def test_warmup_prompt_ids_stay_inside_our_vocabulary(ours):
    """vLLM's warm-up feeds ids up to the decode query length (a jump-share engine's canvas width,
    252 by default) into a model whose vocabulary may be smaller (128 rows): for our models the ids
    are taken modulo the vocabulary; other models see vLLM's ids unchanged."""
    import types

    from vllm_odb.patches import warmup_ids

    hf = types.SimpleNamespace(odb_engine={"method": "odb"} if ours else None)
    runner = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=hf, get_vocab_size=lambda: 128))
    seen = []
    warmup_ids.wrap(_warmup_like(252))(runner, lambda out: seen.extend(out.scheduled_new_reqs), None)
    assert len(seen) == 2
    for req in seen:
        if ours:
            assert max(req.prompt_token_ids) == 127 and req.prompt_token_ids == req.prefill_token_ids
            assert req.prompt_token_ids[128:131] == [0, 1, 2]
        else:
            assert req.prompt_token_ids == list(range(252))


@pytest.mark.parametrize("version", ["0.33.0", "0.27.1", "0.26.1"])
def test_register_on_another_vllm_is_one_line_naming_both_versions(monkeypatch, version):
    """What ``vllm serve`` / ``LLM(...)`` on an unsupported vLLM raise from the plugin entry point:
    one line naming the installed and the supported version, before any other vLLM internals are
    touched (no patch applied, nothing registered)."""
    monkeypatch.setattr(vllm, "__version__", version)
    monkeypatch.setattr(vllm_odb, "_registered", False)
    monkeypatch.setattr(patches, "apply_all", lambda: pytest.fail("apply_all ran on an unsupported vLLM"))
    with pytest.raises(RuntimeError) as e:
        vllm_odb.register()
    message = str(e.value)
    assert "\n" not in message
    assert f"vllm=={version}" in message and f"vllm=={patches.SUPPORTED_VLLM}" in message
    assert not vllm_odb._registered
