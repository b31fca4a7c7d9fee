"""Patch: ``"odb"`` as a speculative method (vllm/config/speculative.py and
vllm/engine/arg_utils.py, 0.26.0).

ODB-dLLM's speculation (jump-share) verifies drafted states of a diffusion block inside the block's
own decode forward; it shares nothing with vLLM's draft-model-and-rejection-sampling speculators
except the name. Users still reach for the speculative flags, so all of these select it:

    vllm serve <model> --speculative odb
    vllm serve <model> --speculative-config '{"method": "odb", "threshold": 0.8}'
    vllm serve <model> --spec-method odb
    LLM(<model>, speculative_config={"method": "odb", ...})

What is patched, and why each piece is needed:

1. ``SpeculativeConfig.method`` is a closed ``Literal`` inside a pydantic dataclass with
   ``extra="forbid"``: "odb" is added and the class rebuilt. Its ``__post_init__`` (draft-model
   discovery) and ``_verify_args`` validator (``num_speculative_tokens`` required) are skipped for
   "odb", so ``SpeculativeConfig(method="odb")`` constructs and ``--spec-method odb`` parses.
2. ``EngineArgs.create_speculative_config``: a ``{"method": "odb", ...}`` dict becomes the engine's
   decoding section, ``additional_config["odb"]`` (``method: "odb"`` plus the other keys, which
   are decoding knobs: unknown ones are refused by name), and the engine is built with *no*
   ``SpeculativeConfig``. vLLM's V2 runner accepts only eagle/mtp/dflash/dspark speculators and
   would refuse the engine, and the canvas (``diffusion_config``) must stay what sets the draft
   slots per step. Only for our models: on any other model "odb" is an error naming the flag.
3. ``EngineArgs.add_cli_args`` gains ``--speculative METHOD``, shorthand for
   ``--speculative-config '{"method": METHOD}'`` (merged into it when both are given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

NAME = "speculative_odb"
METHOD = "odb"


def odb_section(spec: dict, additional: dict | None, hf_config) -> dict:
    """The ``additional_config`` that a ``{"method": "odb", ...}`` speculative config becomes.
    Raises ``ValueError`` naming the flag or knob."""
    from vllm_odb import ARCHITECTURES
    from vllm_odb.engine.knobs import ENGINE_SECTION, engine_config

    if not set(getattr(hf_config, "architectures", None) or ()) & set(ARCHITECTURES):
        raise ValueError(f"speculative_config.method={METHOD!r} needs a diffusion LM served by vllm-odb "
                         f"(LLaDA or Dream); this model is {getattr(hf_config, 'model_type', '?')!r}")
    knobs = {k.replace("-", "_"): v for k, v in spec.items() if k != "method"}
    additional = dict(additional or {})
    section = additional.get(ENGINE_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"additional_config.{ENGINE_SECTION} must be a JSON object, got {section!r}")
    if section.get("method", METHOD) != METHOD:
        raise ValueError(f"speculative_config.method={METHOD!r} conflicts with "
                         f"additional_config.{ENGINE_SECTION}.method={section['method']!r}")
    clash = sorted(k for k in knobs if k in section and section[k] != knobs[k])
    if clash:
        raise ValueError(f"speculative_config and additional_config.{ENGINE_SECTION} set {clash} differently")
    merged = {**section, **knobs, "method": METHOD}
    try:
        engine_config({ENGINE_SECTION: merged})
    except ValueError as e:
        raise ValueError(str(e).replace(f"additional_config.{ENGINE_SECTION}", "speculative_config")) from None
    additional[ENGINE_SECTION] = merged
    return additional


class _SpeculativeShorthand(argparse.Action):
    """``--speculative METHOD``: sets ``speculative_config["method"]``."""

    def __call__(self, parser, namespace, value, option_string=None):
        current = getattr(namespace, self.dest, None) or {}
        if current.get("method", value) != value:
            parser.error(f"--speculative {value} conflicts with --speculative-config method {current['method']!r}")
        setattr(namespace, self.dest, {**current, "method": value})


def _extend_method_literal(cls) -> None:
    import pydantic

    hint = cls.__annotations__["method"]
    literal = next(a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal)
    values = typing.get_args(literal)
    if METHOD in values:
        return
    new = typing.Optional[typing.Literal[values + (METHOD,)]]  # noqa: UP045 (a runtime type object)
    cls.__annotations__["method"] = new
    cls.__dataclass_fields__["method"].type = new
    decorators = cls.__pydantic_decorators__.model_validators
    verify = decorators["_verify_args"]
    original_verify = verify.func

    def _verify_args(self):
        return self if self.method == METHOD else original_verify(self)

    decorators["_verify_args"] = dataclasses.replace(verify, func=_verify_args)
    original_post_init = cls.__post_init__

    def __post_init__(self):
        if self.method != METHOD:
            original_post_init(self)

    cls.__post_init__ = __post_init__
    pydantic.dataclasses.rebuild_dataclass(cls, force=True)


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig
    from vllm.engine import arg_utils
    from vllm.engine.arg_utils import EngineArgs

    _extend_method_literal(SpeculativeConfig)
    arg_utils._compute_kwargs.cache_clear()  # argparse choices for --spec-method come from the Literal

    create = EngineArgs.create_speculative_config
    if not getattr(create, "_odb_patched", False):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            spec = self.speculative_config
            if isinstance(spec, str):
                spec = json.loads(spec)
            method = (spec or {}).get("method", self.spec_method)
            if method != METHOD:
                return create(self, target_model_config, target_parallel_config)
            if self.spec_model is not None or self.spec_tokens is not None:
                raise ValueError(f"--spec-model/--spec-tokens do not apply to speculative method {METHOD!r} "
                                 "(jump-share drafts come from the diffusion model itself)")
            self.additional_config = odb_section(spec or {"method": METHOD}, self.additional_config,
                                                 target_model_config.hf_config)
            self.speculative_config = None
            self.spec_method = None
            return None

        create_speculative_config._odb_patched = True
        EngineArgs.create_speculative_config = create_speculative_config

    add = EngineArgs.add_cli_args
    if not getattr(add, "_odb_patched", False):
        def add_cli_args(parser):
            parser = add(parser)
            parser.add_argument(
                "--speculative", dest="speculative_config", action=_SpeculativeShorthand, metavar="METHOD",
                help="Shorthand for --speculative-config '{\"method\": METHOD}'; 'odb' selects ODB-dLLM "
                     "decoding for diffusion LMs served by vllm-odb.")
            return parser

        add_cli_args._odb_patched = True
        EngineArgs.add_cli_args = staticmethod(add_cli_args)
