"""Shared pieces of the vLLM plugin's CPU tests: the tiny checkpoints as vLLM loads them, the engine
section they run with, and vLLM's config path on its CPU platform. No GPU, no network."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from vllm_odb.engine.knobs import canvas_width, engine_config
from vllm_odb.models.configs import DreamConfig, LLaDAConfig

REPO = Path(__file__).resolve().parents[1]
TINY = {"llada": REPO / "checkpoints" / "tiny-llada", "dream": REPO / "checkpoints" / "tiny-dream"}
CONFIG_CLASS = {"llada": LLaDAConfig, "dream": DreamConfig}
SHIFT = {"llada": 0, "dream": 1}
ARCHS = ("LLaDAModelLM", "DreamModel")
ODB = {"odb": {"block_length": 16, "gen_length": 64}}
torch.set_num_threads(2)


@pytest.fixture(scope="module", autouse=True)
def plugins_loaded():
    """What every vLLM process does at start: run the ``vllm.general_plugins`` entry points."""
    import vllm.plugins

    vllm.plugins.load_general_plugins()


def _engine():
    return engine_config(ODB)


def _hf_config(fmt: str, engine=None):
    """The tiny checkpoint's config as vLLM loads it, with the engine knobs the hook would set."""
    cfg = CONFIG_CLASS[fmt].from_pretrained(str(TINY[fmt]))
    engine = engine or _engine()
    cfg.odb_engine = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
    cfg.canvas_length = canvas_width(engine, SHIFT[fmt])
    return cfg


def _cpu_shims(mp: pytest.MonkeyPatch) -> None:
    import vllm.config.vllm as vllm_config_module
    import vllm.engine.arg_utils as arg_utils
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    cpu = CpuPlatform()
    mp.setattr(platforms, "_current_platform", cpu)
    mp.setattr(arg_utils, "current_platform", cpu)  # bound at import (the plugin imports it early)
    mp.setattr(vllm_config_module, "HAS_TRITON", True)  # the diffusion path checks Triton (MRv2)


def _create(fmt: str, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=str(TINY[fmt]), dtype="float32", max_model_len=512, additional_config=ODB)
    return EngineArgs(**{**args, **kwargs}).create_engine_config()


@pytest.fixture
def cpu_vllm(monkeypatch):
    _cpu_shims(monkeypatch)
