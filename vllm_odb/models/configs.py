"""Hugging Face config classes for LLaDA and Dream, owned by the plugin.

The official checkpoints ship remote code written for transformers 4.38-4.46; vLLM 0.26 needs
transformers >= 5.5.3. These classes read the same config.json (through ``ModelSpec``, the one
parser every engine shares) and expose the standard names vLLM reads (``hidden_size``,
``num_attention_heads``, ``num_key_value_heads``, ...), so no ``trust_remote_code`` is needed.
``canvas_length`` marks the model as a diffusion model for vLLM (``ModelConfig.is_diffusion``);
the engine hook (hook.py) sets it to the engine's block length.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from vllm_odb.checkpoint import ModelSpec

DEFAULT_BLOCK_LENGTH = 32  # DecodeConfig's default; the hook replaces it with the engine's


class _DiffusionLMConfig(PretrainedConfig):
    """Shared body: the official keys stay as they are (so the config round-trips), and the
    standard names are derived from them once."""

    # transformers 5 makes every config class a dataclass: derived fields go in __post_init__.
    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Keys this class adds are not official config keys; do not re-read them as such.
        raw = {k: v for k, v in self.to_dict().items() if not k.startswith("odb_")}
        raw.setdefault("model_type", self.model_type)
        if raw.get(self._size_key) is None:
            return  # a bare instance (transformers builds one to diff against defaults)
        spec = ModelSpec.from_config(raw)
        self.odb_spec = spec.to_dict()
        self.hidden_size = spec.hidden_size
        self.num_attention_heads = spec.num_heads
        self.num_key_value_heads = spec.num_kv_heads
        self.num_hidden_layers = spec.num_layers
        self.intermediate_size = spec.intermediate_size
        self.head_dim = spec.head_dim
        self.vocab_size = spec.vocab_size  # embedding rows = logits width
        self.max_position_embeddings = spec.max_position
        self.rope_theta = spec.rope_theta
        self.rms_norm_eps = spec.rms_norm_eps
        self.hidden_act = "silu"
        self.tie_word_embeddings = spec.tie_word_embeddings
        self.mask_token_id = spec.mask_token_id
        if getattr(self, "canvas_length", None) is None:
            self.canvas_length = DEFAULT_BLOCK_LENGTH + spec.logits_shift

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(**self.odb_spec)


class LLaDAConfig(_DiffusionLMConfig):
    model_type = "llada"
    _size_key = "d_model"


class DreamConfig(_DiffusionLMConfig):
    model_type = "Dream"
    _size_key = "hidden_size"
