"""Patch: ``SamplingParams._validate_diffusion`` (vllm/sampling_params.py, 0.26.0).

vLLM's diffusion path rejects every request whose temperature is not 1.0 (it was written for
DiffusionGemma's fixed temperature schedule), so greedy decoding (``temperature=0``), which
LLaDA's and Dream's papers report and Dream's generation_config asks for, fails validation. For
our models this replacement accepts any temperature >= 0 (the decoding policy uses it: 0 = argmax,
> 0 = Gumbel sampling), keeps vLLM's refusals that still hold (min_p, seed when sampling,
min_tokens, logit_bias, bad_words, allowed_token_ids; logprobs, which the engine does not
produce), drops the seed of a greedy request (nothing to seed; OpenAI clients such as lm-eval's
send one with every request), refuses
``n > 1`` and the OpenAI ``best_of`` that vLLM would silently ignore, and
validates the decoding knobs in ``extra_args`` here, in the front end, so a bad knob is a
``ValueError`` naming it (HTTP 400 on the server) instead of an engine failure. When the request
names a ``gen_length``, ``max_tokens`` is capped at it: the canvas is all there is to return.
Other models go to vLLM's original method.

An empty prompt is refused the same way: vLLM refuses ``prompt: ""`` itself, but a blank or
whitespace prompt, an empty item of a prompt list, or a chat whose last user message is empty
still render to tokens (the chat template, a BOS), and a diffusion LM fills its canvas with noise
from them. The request wrapper below marks such a request in ``extra_args``, naming the field,
for ``validate_odb_request`` to refuse (HTTP 400); offline ``LLM.generate`` takes the caller's
prompts as given.
"""

from __future__ import annotations

from vllm_odb.errors import ODBError

NAME = "diffusion_params"
_SAMPLING_EPS = 1e-5
# OpenAI request fields vLLM 0.26 accepts and silently ignores; the request wrapper below carries
# them into ``extra_args`` under this key so our validation can refuse them by name.
IGNORED_FIELDS_KEY = "_odb_ignored_openai_fields"
_IGNORED_FIELDS = ("best_of",)
# The request field holding an empty prompt ("prompt", "prompt[2]", "messages[1].content"), carried
# the same way.
EMPTY_PROMPT_KEY = "_odb_empty_prompt"


def validate_odb_request(params, hf_config) -> None:
    from vllm_odb.engine.knobs import request_config
    from vllm_odb.policies import DecodeConfig

    extra = dict(params.extra_args or {})
    ignored = extra.pop(IGNORED_FIELDS_KEY, {}) or {}
    greedy = params.temperature < _SAMPLING_EPS
    empty = extra.pop(EMPTY_PROMPT_KEY, None)
    if empty:
        raise ODBError(f"{empty} is empty: a diffusion LM would decode noise from it; send the text to answer")
    refused = [name for name, bad in (
        ("n", params.n > 1),
        *((name, True) for name in sorted(ignored)),
        ("min_p", params.min_p > _SAMPLING_EPS),
        ("seed", params.seed is not None and not greedy),
        ("min_tokens", params.min_tokens > 0),
        ("logit_bias", bool(params.logit_bias)),
        ("bad_words", bool(params.bad_words)),
        ("allowed_token_ids", bool(params.allowed_token_ids)),
        ("logprobs", params.logprobs is not None),
        ("prompt_logprobs", params.prompt_logprobs is not None),
    ) if bad]
    if refused:
        raise ValueError(f"{', '.join(refused)}: not supported for diffusion LMs on vllm-odb"
                         + (" (one completion per request; send the request n times)" if "n" in refused else ""))
    for stop in [params.stop] if isinstance(params.stop, str) else params.stop or []:
        if isinstance(stop, str) and not stop.isascii():  # a lone surrogate cannot reach the engine core
            try:
                stop.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"stop={stop!r}: not valid unicode (a lone surrogate)") from None
    if IGNORED_FIELDS_KEY in (params.extra_args or {}) or EMPTY_PROMPT_KEY in (params.extra_args or {}):
        params.extra_args = extra or None
    if greedy:
        params.seed = None  # argmax decoding draws nothing: the seed changes nothing
    engine = DecodeConfig(**hf_config.odb_engine)
    cfg = request_config(engine, params.extra_args, params.temperature, params.max_tokens)
    if params.extra_args and "gen_length" in params.extra_args:
        if params.max_tokens is None or params.max_tokens > cfg.gen_length:
            params.max_tokens = cfg.gen_length


def empty_prompt_field(request) -> str | None:
    """The field of an OpenAI completion or chat request that holds an empty prompt, or None:
    a blank ``prompt`` or prompt-list item, or a last user message without text or other parts."""
    if hasattr(request, "messages"):
        users = [i for i, m in enumerate(request.messages or []) if _get(m, "role") == "user"]
        if users and _blank(_get(request.messages[users[-1]], "content")):
            return f"messages[{users[-1]}].content"
        return None
    prompt = getattr(request, "prompt", None)
    if prompt is None:
        return None  # prompt_embeds instead: vLLM's own checks
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return "prompt" if _blank(prompt) else None
    return next((f"prompt[{i}]" for i, item in enumerate(prompt) if _blank(item)), None)


def _get(message, key):
    return message.get(key) if isinstance(message, dict) else getattr(message, key, None)


def _blank(content) -> bool:
    """No text (or only whitespace) and nothing else: a string, a token list, or chat parts."""
    if content is None:
        return True
    if isinstance(content, str):
        return not content.strip()
    if isinstance(content, (list, tuple)):  # token ids, or chat parts (text, image, ...)
        return all(not isinstance(part, int) and _get(part, "type") == "text" and _blank(_get(part, "text"))
                   for part in content)
    return False


def _carry_ignored_fields(request_cls) -> None:
    """Wrap ``request_cls.to_sampling_params``: OpenAI fields vLLM ignores (``best_of``) and an
    empty prompt (``empty_prompt_field``) ride along in ``extra_args`` when present, for
    ``validate_odb_request`` to refuse. Other models never look at those keys (``extra_args`` is
    free-form)."""
    original = request_cls.to_sampling_params
    if getattr(original, "_odb_patched", False):
        return

    def to_sampling_params(self, *args, **kwargs):
        params = original(self, *args, **kwargs)
        extra = getattr(self, "model_extra", None) or {}
        carried = {}
        ignored = {k: extra[k] for k in _IGNORED_FIELDS if extra.get(k) not in (None, 1)}
        if ignored:
            carried[IGNORED_FIELDS_KEY] = ignored
        empty = empty_prompt_field(self)
        if empty:
            carried[EMPTY_PROMPT_KEY] = empty
        if carried:
            params.extra_args = {**(params.extra_args or {}), **carried}
        return params

    to_sampling_params._odb_patched = True
    request_cls.to_sampling_params = to_sampling_params


def apply() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.sampling_params import SamplingParams

    from vllm_odb.patches import is_odb_model

    for request_cls in (CompletionRequest, ChatCompletionRequest):
        _carry_ignored_fields(request_cls)

    original = SamplingParams._validate_diffusion
    if getattr(original, "_odb_patched", False):
        return

    def _validate_diffusion(self, model_config):
        if is_odb_model(model_config.hf_config):
            return validate_odb_request(self, model_config.hf_config)
        return original(self, model_config)

    _validate_diffusion._odb_patched = True
    SamplingParams._validate_diffusion = _validate_diffusion
