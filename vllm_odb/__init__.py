"""vllm-odb: diffusion LLMs (LLaDA, Dream) on vLLM with Fast-dLLM and ODB-dLLM decoding."""

__version__ = "0.1.0"

# Architectures the official checkpoints declare -> our vLLM model classes (lazy: no CUDA at import).
ARCHITECTURES = {
    "LLaDAModelLM": "vllm_odb.models.diffusion_lm:LLaDAForDiffusionLM",
    "DreamModel": "vllm_odb.models.diffusion_lm:DreamForDiffusionLM",
}
# config.json model_type -> our config class name in vllm_odb.models.configs.
CONFIG_CLASSES = {"llada": "LLaDAConfig", "Dream": "DreamConfig"}

_registered = False


def register() -> None:
    """vLLM general-plugin entry point (``vllm.general_plugins``), called in every vLLM process.

    Idempotent and GPU-free. Registers LLaDA and Dream as generate models (without it vLLM would
    take ``DreamModel`` for a pooling model), their config classes (no ``trust_remote_code``),
    the engine config hook and the dLLM metrics collector, and applies the version-checked
    patches (vllm_odb/patches)."""
    global _registered
    if _registered:
        return
    from vllm_odb import patches

    # First, before any other vLLM import: on another vLLM version the error is this one line
    # naming both versions, not whatever internal module moved.
    patches.check_vllm_version()
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from vllm_odb.engine import metrics
    from vllm_odb.models import configs
    from vllm_odb.models.hook import ODBConfigHook

    patches.apply_all()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
        MODELS_CONFIG_MAP[arch] = ODBConfigHook
    for model_type, name in CONFIG_CLASSES.items():
        _CONFIG_REGISTRY[model_type] = getattr(configs, name)
    metrics.metrics_dir(create=True)  # the engine processes this one starts inherit it
    metrics.register_collector()  # dLLM counters on /metrics (engine/metrics.py)
    share_vllm_logging()
    _registered = True


def share_vllm_logging() -> None:
    """Our modules' log records go where vLLM's go, at vLLM's level (``VLLM_LOGGING_LEVEL``):
    vLLM configures its own ``vllm`` logger only, so ``vllm_odb``'s INFO lines (which CUDA-graph
    mode a jump-share engine chose, that refreshes replay graphs) were dropped by the root logger's
    WARNING level. Left alone when the application gave ``vllm_odb`` handlers of its own."""
    import logging

    ours, theirs = logging.getLogger("vllm_odb"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False
