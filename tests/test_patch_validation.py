"""Request validation in the front end (CPU; patches/diffusion_params.py): every ODB knob and vLLM
sampling field a dLLM cannot honour is refused by name when the request is submitted, and
the OpenAI fields n and best_of too."""

from __future__ import annotations

import re
import types

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402

from vllm_odb.models.configs import LLaDAConfig  # noqa: E402
from vllm_plugin_common import TINY, _hf_config, plugins_loaded  # noqa: E402,F401


@pytest.fixture(scope="module")
def odb_model_config():
    return types.SimpleNamespace(is_diffusion=True, hf_config=_hf_config("llada"))

# ---------------------------------------------------------------------------------------------
# The request validation patch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_validation_accepts_any_temperature(odb_model_config, temperature):
    SamplingParams(temperature=temperature, max_tokens=32)._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("extra", [{"threshold": 0.7}, {"rule": "factor", "factor": 2.0}])
def test_validation_accepts_good_knobs(odb_model_config, extra):
    SamplingParams(temperature=0, extra_args=extra)._validate_diffusion(odb_model_config)


def test_validation_refuses_a_knob_the_request_config_ignores(odb_model_config):
    with pytest.raises(ValueError, match=r"^extra_args: threshold=0.7 does nothing with rule='factor'"):
        SamplingParams(temperature=0, extra_args={"threshold": 0.7, "rule": "factor"})._validate_diffusion(
            odb_model_config)


@pytest.mark.parametrize("extra, name", [({"bogus": 1}, "bogus"), ({"threshold": 1.5}, "threshold"),
                                         ({"block_length": 32}, "block_length"), ({"jump": True}, "jump")])
def test_validation_bad_knob_names_it(odb_model_config, extra, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SamplingParams(temperature=0, extra_args=extra)._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("kwargs, name", [
    ({"seed": 1}, "seed"),
    ({"logprobs": 1}, "logprobs"),
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"min_p": 0.1}, "min_p"),
    ({"min_tokens": 1}, "min_tokens"),
    ({"logit_bias": {1: 1.0}}, "logit_bias"),
    ({"bad_words": ["x"]}, "bad_words"),
    ({"allowed_token_ids": [1]}, "allowed_token_ids"),
])
def test_validation_refused_params_name_them(odb_model_config, kwargs, name):
    params = SamplingParams(temperature=0.7, **kwargs)  # not greedy: vLLM resets min_p when greedy
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        params._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("max_tokens, want", [(100, 32), (None, 32), (10, 10)])
def test_validation_caps_max_tokens_at_explicit_gen_length(odb_model_config, max_tokens, want):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args={"gen_length": 32})
    params._validate_diffusion(odb_model_config)
    assert params.max_tokens == want


def test_validation_leaves_max_tokens_without_gen_length(odb_model_config):
    params = SamplingParams(temperature=0, max_tokens=100)
    params._validate_diffusion(odb_model_config)
    assert params.max_tokens == 100


def test_other_diffusion_models_keep_vllm_check():
    other = types.SimpleNamespace(is_diffusion=True,
                                  hf_config=LLaDAConfig.from_pretrained(str(TINY["llada"])))  # no odb_engine
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0)._validate_diffusion(other)
    SamplingParams(temperature=1.0)._validate_diffusion(other)  # vLLM's one allowed temperature


def test_non_diffusion_models_untouched():
    other = types.SimpleNamespace(is_diffusion=False, hf_config=types.SimpleNamespace())
    SamplingParams(temperature=0, seed=1)._validate_diffusion(other)

# ---------------------------------------------------------------------------------------------
# OpenAI request fields: n, best_of
# ---------------------------------------------------------------------------------------------


def test_validation_refuses_n_above_one(odb_model_config):
    with pytest.raises(ValueError, match=r"\bn\b.*send the request n times"):
        SamplingParams(temperature=0.7, n=2)._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_best_of_is_refused_by_name(odb_model_config, api):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    if api == "chat":
        req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], best_of=2)
        params = req.to_sampling_params(16, {})
    else:
        req = CompletionRequest(model="m", prompt="hi", best_of=2)
        params = req.to_sampling_params(16, None)
    with pytest.raises(ValueError, match=r"\bbest_of\b"):
        params._validate_diffusion(odb_model_config)


def test_best_of_one_is_fine_and_leaves_extra_args_clean(odb_model_config):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    params = CompletionRequest(model="m", prompt="hi", best_of=1, vllm_xargs={"threshold": 0.7}).to_sampling_params(
        16, None)
    params._validate_diffusion(odb_model_config)
    assert params.extra_args == {"threshold": 0.7}


# ---------------------------------------------------------------------------------------------
# Empty prompts, and the HTTP status of a refusal
# ---------------------------------------------------------------------------------------------


def _completion(prompt):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest(model="m", prompt=prompt).to_sampling_params(16, None)


def _chat(messages):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="m", messages=messages).to_sampling_params(16, {})


@pytest.mark.parametrize("make, field", [
    (lambda: _completion("   "), "prompt"),
    (lambda: _completion(["What is 2+2?", ""]), "prompt[1]"),
    (lambda: _completion([[5, 6], []]), "prompt[1]"),
    (lambda: _chat([{"role": "user", "content": ""}]), "messages[0].content"),
    (lambda: _chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " \n"}]),
     "messages[1].content"),
    (lambda: _chat([{"role": "user", "content": [{"type": "text", "text": ""}]}]), "messages[0].content"),
])
def test_empty_prompt_is_refused_naming_the_field(odb_model_config, make, field):
    """vLLM refuses prompt="" itself; these would render to tokens (a template, a BOS) and decode noise."""
    with pytest.raises(ValueError, match=rf"^{re.escape(field)} is empty"):
        make()._validate_diffusion(odb_model_config)


@pytest.mark.parametrize("make", [lambda: _completion("Reverse the word planet."), lambda: _completion([[5, 6]]),
                                  lambda: _chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])])
def test_prompts_with_text_pass_and_leave_extra_args_clean(odb_model_config, make):
    params = make()
    params._validate_diffusion(odb_model_config)
    assert not params.extra_args


def test_empty_prompt_mark_leaves_other_models_alone():
    """Other models see the mark in their free-form extra_args and go on to vLLM's own checks."""
    other = types.SimpleNamespace(is_diffusion=False, hf_config=types.SimpleNamespace())
    _completion("  ")._validate_diffusion(other)


@pytest.mark.parametrize("make", [lambda: _completion(" "),
                                  lambda: SamplingParams(temperature=0, extra_args={"factor": 2.0}),
                                  lambda: SamplingParams(temperature=0, extra_args={"threshold": 3})])
def test_refusals_are_http_400(odb_model_config, make):
    """vLLM 0.26's server maps a ValueError raised in request validation to 400 BadRequestError
    (serve/utils/error_response.py), with our one line as the message."""
    from vllm.entrypoints.serve.utils.error_response import create_error_response

    with pytest.raises(ValueError) as e:
        make()._validate_diffusion(odb_model_config)
    err = create_error_response(e.value).error
    assert (err.code, err.type) == (400, "BadRequestError")
    assert err.message == str(e.value) and "\n" not in err.message
