"""vllm-odb: diffusion LLMs (LLaDA, Dream) on vLLM with Fast-dLLM and ODB-dLLM decoding."""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM general-plugin entry point. Idempotent and importable without a GPU.

    It is called in every vLLM process (front end, engine core, workers). The vLLM model classes
    are registered here once they exist (see the vLLM-architectures issue); today it only marks
    the plugin as loaded."""
    global _registered
    if _registered:
        return
    _registered = True
