"""Patch: a request body that is not a JSON object is a 400, not a 500
(``CompletionRequest`` and ``ChatCompletionRequest``, vllm/entrypoints/openai/{completion,
chat_completion}/protocol.py; their outermost validator ``__log_extra_fields__`` comes from
``OpenAIBaseModel`` in vllm/entrypoints/openai/engine/protocol.py, 0.26.0).

Both request models carry ``mode="before"`` validators (``check_cache_salt_support``,
``validate_prompt_list_length``, ...) that call ``data.get(...)`` before pydantic has checked that
the body is an object, so a body that is a JSON array, number or string (``[...]``, ``42``,
``"text"``) raises ``AttributeError`` inside validation: uvicorn answers 500 and closes the
connection, and a client's next request on that keep-alive connection is reset (the GPU fuzz run:
three 500s, three resets). The outermost validator (a ``mode="wrap"`` one that runs all the
others) now refuses a non-object first with a validation error naming what the body is (HTTP 400).
It applies to every model the server serves: such a body is malformed whatever the model, and only
its error changes (from a 500 to a 400); a dict or a model instance validates as before. A subclass
of either request model defined after this patch does not inherit it (pydantic re-reads the
original validator when it builds a subclass); vLLM 0.26 defines none.
"""

from __future__ import annotations

import dataclasses

NAME = "request_body"
VALIDATOR = "__log_extra_fields__"


def wrap(original):
    from pydantic import BaseModel

    def log_extra_fields(data, handler):
        if not isinstance(data, (dict, BaseModel)):  # an instance (model_validate(request)) stays valid
            raise ValueError(f"the request body must be a JSON object, not {type(data).__name__}")
        return original(data, handler)

    log_extra_fields.__wrapped__ = original
    return log_extra_fields


def _patch(request_cls) -> None:
    """Swap the model's validator for the wrapped one and rebuild the model's validation."""
    validators = request_cls.__pydantic_decorators__.model_validators
    decorator = validators.get(VALIDATOR)
    if decorator is None or getattr(decorator.func, "_odb_patched", False):
        return
    patched = wrap(decorator.func)
    patched._odb_patched = True
    validators[VALIDATOR] = dataclasses.replace(decorator, func=patched)
    request_cls.model_rebuild(force=True)


def apply() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    for request_cls in (CompletionRequest, ChatCompletionRequest):
        _patch(request_cls)
