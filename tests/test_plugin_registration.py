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
