"""``odb-reference``: an lm-eval model that answers with the reference engine (no vLLM, no server).

    python -m vllm_odb.eval --model odb-reference \\
        --model_args pretrained=checkpoints/tiny-llada,method=odb,block_length=32 \\
        --tasks odb_suite --apply_chat_template --limit 20

Runs ``generate_until`` requests only (a diffusion LM scores no log-likelihoods here). Each
request decodes like ``python -m vllm_odb.bench quality``: ``DecodeConfig.for_method(method,
gen_length, block_length, **knobs)``, the requests in their given order in batches of
``batch_size`` (quality's ``--batch-size``, 32), the response cut at the first end marker and
decoded without special tokens. The gen length is the request's ``max_gen_toks`` rounded up to
whole blocks, as the vLLM engine does with ``max_tokens``; a request's ``until`` strings are end
markers (the reference loop's ``stop``) and cut the text; ``temperature`` and an ``extra_args``
dict of knobs in the task's or ``--gen_kwargs`` generation arguments apply per request, like
``SamplingParams.extra_args`` on the engine.

With ``--apply_chat_template`` the context is the checkpoint's chat template around the prompt
(what ``Checkpoint.encode_chat`` tokenizes); without it the raw prompt is tokenized as it is.
"""

from __future__ import annotations

import json

import lm_eval.models  # noqa: F401  lm-eval's own models first: it loads them only into an empty registry
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

NAME = "odb-reference"
_DTYPES = ("float32", "bfloat16", "float16")


@register_model(NAME)
class ReferenceLM(LM):
    def __init__(self, pretrained: str = "checkpoints/tiny-llada", method: str = "odb", block_length: int = 32,
                 dtype: str = "float32", device: str | None = None, batch_size: int | str | None = 32,
                 max_batch_size: int | None = None, seed: int = 0, **knobs):
        """``knobs``: any other ``DecodeConfig`` field (``threshold``, ``ridge_rows``, ...) for
        every request. ``device``: default (and lm-eval's ``cuda:0`` on a machine without CUDA)
        cuda if available, else cpu, as ``bench quality``."""
        super().__init__()
        import torch

        from vllm_odb.policies.config import DecodeConfig
        from vllm_odb.reference.loader import load_checkpoint

        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose from {list(_DTYPES)}")
        self.method, self.block_length, self.knobs = method, int(block_length), dict(knobs)
        DecodeConfig.for_method(method, block_length=self.block_length, gen_length=self.block_length, **self.knobs)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's default is cuda:0
        self._device = device
        self.batch_size = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.seed = int(seed)
        self.ckpt = load_checkpoint(pretrained, dtype=getattr(torch, dtype), device=self._device)
        self.pretrained = pretrained

    # -- lm-eval's interface --------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.ckpt.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.ckpt.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                       tokenize=False)

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{NAME} runs generate_until tasks only")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(f"{NAME} runs generate_until tasks only")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation arguments decode together, in their given order."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                for i, text in zip(chunk, self._decode([requests[i].args[0] for i in chunk], gen_kwargs)):
                    out[i] = text
        return out  # type: ignore[return-value]

    # -- decoding --------------------------------------------------------------------------------

    def config(self, gen_kwargs: dict):
        """The ``DecodeConfig`` of a request with generation arguments ``gen_kwargs``."""
        from vllm_odb.policies.config import DecodeConfig

        kw = dict(gen_kwargs or {})
        max_tokens = kw.get("max_gen_toks", kw.get("max_tokens", 64))
        gen_length = max(1, -(-int(max_tokens) // self.block_length)) * self.block_length
        knobs = dict(kw.get("extra_args") or {})
        if kw.get("temperature") is not None:
            knobs["temperature"] = float(kw["temperature"])
        method = knobs.pop("method", self.method)
        cfg = DecodeConfig.for_method(method, gen_length=gen_length, block_length=self.block_length, **knobs)
        # The model's knobs are defaults, as an engine's are on the server: a request's own knobs win,
        # and a default the request's method ignores (ridge_rows under fast-dllm) is left out.
        defaults = {k: v for k, v in self.knobs.items() if k not in knobs and _acts(cfg, k)}
        return cfg.replace(**defaults) if defaults else cfg

    def _decode(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        import torch

        from vllm_odb.reference.generate import generate, response_ids

        tok = self.ckpt.tokenizer
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        stop = [tok(s, add_special_tokens=False)["input_ids"] for s in until if s]
        prompts = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
        gen = torch.Generator(device=self._device).manual_seed(self.seed)
        res = generate(self.ckpt.model, prompts, self.config(gen_kwargs), self.ckpt.special, generator=gen,
                       stop=stop or None)
        texts = []
        for canvas in res.tokens:
            text = tok.decode(response_ids(canvas, self.ckpt.special), skip_special_tokens=True)
            for s in until:
                if s:
                    text = text.split(s)[0]
            texts.append(text)
        return texts


def _acts(cfg, knob: str) -> bool:
    """Whether ``knob`` does anything under ``cfg`` (policies/config.py's KNOB_ACTS_WHEN)."""
    from vllm_odb.policies.config import KNOB_ACTS_WHEN

    setting, acting = KNOB_ACTS_WHEN.get(knob, (None, ()))
    return setting is None or getattr(cfg, setting) in acting
