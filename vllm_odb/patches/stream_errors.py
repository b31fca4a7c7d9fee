"""Patch: a streamed completion that fails before its first token ends with an error event
(``OpenAIServingCompletion.completion_stream_generator`` in
vllm/entrypoints/openai/completion/serving.py, 0.26.0).

When a request ends with ``finish_reason="error"`` (patches/request_errors.py: our sampler failed
it), vLLM's stream generators raise ``GenerationError`` and send an error event. The completions
stream checks the finish reason only after its "chunked prefill" skip: an output with no text, no
token ids and no earlier tokens is skipped, so a request that fails before any token is sent as
an empty stream, ``[DONE]`` and HTTP 200. A diffusion LM emits nothing until a block is decided,
so every early failure looked like a successful empty answer (the GPU fault run: the streamed
completions faulted at forwards 1 and 2). The wrapper watches the results the generator reads:
an output that finishes with ``error`` raises ``GenerationError`` there, which the generator turns
into its error event, as it does for a failure after the first token. Other models: vLLM's code
unchanged.
"""

from __future__ import annotations

import inspect
import logging

NAME = "stream_errors"
log = logging.getLogger(__name__)


async def raise_on_error(results, request_id: str):
    """``results`` (``(prompt index, RequestOutput)`` pairs), raising ``GenerationError`` at the
    first output that finishes with ``finish_reason="error"``."""
    from vllm.entrypoints.openai.engine.protocol import GenerationError

    async for prompt_idx, res in results:
        if any(out.finish_reason == "error" for out in res.outputs):
            log.error("Request %s failed with an internal error during generation", request_id)
            raise GenerationError("Internal server error")
        yield prompt_idx, res


def wrap(original):
    signature = inspect.signature(original)

    def completion_stream_generator(self, *args, **kwargs):
        model_config = getattr(self, "model_config", None)
        from vllm_odb.patches import is_odb_model

        if model_config is not None and is_odb_model(model_config.hf_config):
            bound = signature.bind(self, *args, **kwargs)
            bound.arguments["result_generator"] = raise_on_error(bound.arguments["result_generator"],
                                                                 bound.arguments["request_id"])
            return original(*bound.args, **bound.kwargs)
        return original(self, *args, **kwargs)

    completion_stream_generator.__wrapped__ = original
    return completion_stream_generator


def apply() -> None:
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    from vllm_odb.patches import install

    install(OpenAIServingCompletion, "completion_stream_generator", wrap)
