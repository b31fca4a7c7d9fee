"""LLaDA and Dream on vLLM's layers, shaped like vLLM's llama.py.

Both checkpoints are Llama-shaped bidirectional transformers (RMSNorm, SwiGLU, NeoX RoPE; Dream
adds q/k/v bias and GQA), so one decoder serves both: parallel linear layers (tensor-parallel
ready), vLLM's RMSNorm and rotary embedding, and ``Attention`` on the paged KV cache. The
attention type stays DECODER (a paged KV cache); it is made bidirectional by the attention
metadata the ``ModelState`` builds (``causal=False``), never by ``is_causal=False``, which would
select ENCODER_ONLY attention and drop the cache.

Besides the compiled ``forward`` that vLLM runs (and captures in CUDA graphs), the model has
``refresh_forward``: the same layers over whole sequences with dense attention supplied by the
caller. The engine uses it for the Fast-dLLM cache refresh (engine/model_state.py
``CacheRefresh``), which has to rewrite KV of positions vLLM considers computed.

Weights load by their official names: LLaDA's OLMo names go through a ``WeightsMapper`` built
from the one name table in ``vllm_odb.checkpoint``; Dream's are already the Llama/Qwen2 names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.sequence import IntermediateTensors
from vllm.v1.attention.backend import AttentionType

from vllm_odb.checkpoint import llada_name_rules

# attend(q, k, v, attn_layer) -> attention output [tokens, heads * head_dim]; see refresh_forward.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Attention], torch.Tensor]


class DiffusionLMMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, quant_config=None, prefix: str = ""):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class DiffusionLMAttention(nn.Module):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__()
        spec = config.spec
        tp = get_tensor_model_parallel_world_size()
        if spec.num_heads % tp:
            raise ValueError(f"num_attention_heads={spec.num_heads} is not divisible by "
                             f"tensor_parallel_size={tp}")
        if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
            raise ValueError(f"num_key_value_heads={spec.num_kv_heads} and tensor_parallel_size={tp}: "
                             "one must divide the other")
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = max(1, spec.num_kv_heads // tp)
        self.head_dim = spec.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, self.head_dim, spec.num_heads, spec.num_kv_heads, bias=spec.qkv_bias,
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(
            spec.num_heads * self.head_dim, spec.hidden_size, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim, max_position=spec.max_position, is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta})
        self.attn = Attention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, attn_type=AttentionType.DECODER,
            prefix=f"{prefix}.attn")

    def project(self, positions: torch.Tensor, hidden_states: torch.Tensor):
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attend: Attend | None = None) -> torch.Tensor:
        q, k, v = self.project(positions, hidden_states)
        out = self.attn(q, k, v) if attend is None else attend(q, k, v, self.attn)
        out, _ = self.o_proj(out)
        return out


class DiffusionLMDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = config.spec
        self.self_attn = DiffusionLMAttention(
            config, vllm_config.cache_config, vllm_config.quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = DiffusionLMMLP(spec.hidden_size, spec.intermediate_size, vllm_config.quant_config,
                                  prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, attend: Attend | None = None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attend)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"},
                                         "intermediate_tensors": {0: "b"}, "inputs_embeds": {0: "b"}})
class DiffusionLMModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        spec = vllm_config.model_config.hf_config.spec
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            DiffusionLMDecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}") for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def refresh_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The same layers, eager, with ``attend`` in place of the paged attention (it also writes
        the keys and values where the caller wants them)."""
        hidden_states = self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, attend)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# Checkpoint names (after the mapper) of the tensors vLLM stacks into one parameter.
_STACKED = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]


class DiffusionLMForVLLM(nn.Module):
    """Shared body of the two registered architectures."""

    hf_to_vllm_mapper = WeightsMapper()
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                              "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        spec = config.spec
        self.config = config
        self.spec = spec
        self.model = DiffusionLMModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if spec.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(spec.vocab_size)

    @staticmethod
    def get_model_state_cls():
        from vllm_odb.engine.model_state import ODBModelState

        return ODBModelState

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for official, tensor in weights:
            name = self.hf_to_vllm_mapper._map_name(official)
            if name is None:
                continue
            if self.spec.tie_word_embeddings and name.startswith("lm_head."):
                continue
            for param_part, ckpt_part, shard in _STACKED:
                if ckpt_part in name:
                    target = name.replace(ckpt_part, param_part)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                target = name
                if target not in params:
                    raise KeyError(f"checkpoint tensor {official!r} (as {name!r}) has no parameter in "
                                   f"{type(self).__name__}")
                param = params[target]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def _mapper_from_rules(rules: list[tuple[re.Pattern, str]]) -> WeightsMapper:
    """A WeightsMapper that applies ``vllm_odb.checkpoint``'s name table (anchored regexes)."""
    regex = {}
    for pattern, template in rules:
        anchored = re.compile("^" + pattern.pattern + "$")
        regex[anchored] = re.sub(r"\{(\w)\}", r"\\g<\1>", template)
    return WeightsMapper(orig_to_new_regex=regex)


class LLaDAForDiffusionLM(DiffusionLMForVLLM):
    """``LLaDAModelLM`` (LLaDA-8B-Instruct, LLaDA-1.5): OLMo-style tensor names."""

    hf_to_vllm_mapper = _mapper_from_rules(llada_name_rules())


class DreamForDiffusionLM(DiffusionLMForVLLM):
    """``DreamModel`` (Dream-v0-7B-Instruct): Qwen2 tensor names, q/k/v bias, logits shifted by one
    (handled by the engine, not here: the model returns plain per-position logits)."""
