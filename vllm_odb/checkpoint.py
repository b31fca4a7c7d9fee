"""Checkpoint facts shared by every engine: config parsing and tensor names.

The official LLaDA checkpoints use OLMo-style names (``model.transformer.blocks.{i}.ff_proj``...),
Dream uses Qwen2 names. Inside vllm-odb every engine uses one layout, the Hugging Face Llama one
(``model.layers.{i}.self_attn.q_proj``...), so Dream maps to itself and LLaDA maps through the
table below. The vLLM model classes reuse the same table for their weights mapper.

Nothing here hard-codes a vocabulary size, a special token id or a block size: all come from the
checkpoint's config.json (and tokenizer files, see ``special_tokens``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from vllm_odb.errors import ODBError

# LLaDA's official names and ours, one row per tensor kind; both directions use this table.
# Fields: {i} a layer index, {p} one of q/k/v, {t} weight or bias. Order matters: the per-block
# ``ff_out`` (down projection) is listed before the top-level ``transformer.ff_out`` (the LM head).
_LLADA_NAMES: list[tuple[str, str]] = [
    ("model.transformer.wte.weight", "model.embed_tokens.weight"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("model.transformer.blocks.{i}.{p}_proj.{t}", "model.layers.{i}.self_attn.{p}_proj.{t}"),
    ("model.transformer.blocks.{i}.attn_out.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("model.transformer.blocks.{i}.ff_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("model.transformer.blocks.{i}.ff_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.transformer.blocks.{i}.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{i}.ff_out.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.transformer.ln_f.weight", "model.norm.weight"),
    ("model.transformer.ff_out.weight", "lm_head.weight"),
]
_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>[qkv])", "t": r"(?P<t>weight|bias)"}


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(x) if k % 2 == 0 else _FIELDS[x] for k, x in enumerate(parts)))


_LLADA_FORWARD = [(_pattern(src), dst) for src, dst in _LLADA_NAMES]
_LLADA_INVERSE = [(_pattern(dst), src) for src, dst in _LLADA_NAMES]

LLADA_ARCH = "LLaDAModelLM"
DREAM_ARCH = "DreamModel"


def _apply_rules(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, template in rules:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    raise KeyError(f"unexpected tensor name {name!r}")


def llada_name_rules() -> list[tuple[re.Pattern, str]]:
    """LLaDA official-name patterns and their internal templates (for vLLM's WeightsMapper)."""
    return list(_LLADA_FORWARD)


def official_to_internal(arch: str, name: str) -> str:
    """Map an official checkpoint tensor name to vllm-odb's (HF Llama) layout."""
    return _apply_rules(name, _LLADA_FORWARD) if arch == "llada" else name


def internal_to_official(arch: str, name: str) -> str:
    return _apply_rules(name, _LLADA_INVERSE) if arch == "llada" else name


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts an engine needs, read from an official-format config.json."""

    arch: str  # "llada" or "dream"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # embedding rows (may exceed the tokenizer's size)
    rope_theta: float
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    rope_in_fp32: bool  # LLaDA rotates q/k in fp32; Dream rotates in the model dtype
    logits_shift: int  # Dream predicts token i from position i-1 (1); LLaDA from i (0)
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int | None
    max_position: int

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_config(cfg: dict) -> "ModelSpec":
        archs = cfg.get("architectures") or []
        model_type = str(cfg.get("model_type", "")).lower()
        if model_type == "llada" or LLADA_ARCH in archs:
            return _llada_spec(cfg)
        if model_type == "dream" or DREAM_ARCH in archs:
            return _dream_spec(cfg)
        raise ValueError(
            f"config.json: model_type={cfg.get('model_type')!r}, architectures={archs!r} is neither "
            f"LLaDA ({LLADA_ARCH}) nor Dream ({DREAM_ARCH})"
        )


def _require(cfg: dict, key: str, kind=None, minimum=None):
    if cfg.get(key) is None:
        raise ValueError(f"config.json: missing {key!r}")
    return _as(cfg, key, kind, minimum=minimum) if kind else cfg[key]


def _as(cfg: dict, key: str, kind, default=None, minimum=None):
    """``cfg[key]`` (or ``default`` when absent or null) as ``kind`` (int or float); a value of
    another type, or below ``minimum``, is refused naming the key."""
    value = cfg.get(key)
    if value is None:
        return default
    what = "an integer" if kind is int else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or (kind is int and not float(value).is_integer()):
        raise ValueError(f"config.json: {key}={value!r} is not {what}")
    if minimum is not None and value < minimum:
        raise ValueError(f"config.json: {key}={value!r} must be {what} >= {minimum}")
    return kind(value)


def _llada_spec(cfg: dict) -> ModelSpec:
    for key, want in (("block_type", "llama"), ("layer_norm_type", "rms")):
        if cfg.get(key, want) != want:
            raise NotImplementedError(f"config.json: LLaDA {key}={cfg[key]!r} (only {want!r} is supported)")
    if cfg.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise NotImplementedError(f"config.json: LLaDA activation_type={cfg['activation_type']!r}")
    for key in ("alibi", "attention_layer_norm", "scale_logits", "input_emb_norm"):
        if cfg.get(key):
            raise NotImplementedError(f"config.json: LLaDA {key}=true is not supported")
    if cfg.get("rope") is False:
        raise NotImplementedError("config.json: LLaDA rope=false is not supported")
    # include_bias puts biases on every linear layer (attn_out and the MLP too); only q/k/v bias
    # (include_qkv_bias) is supported, as in the released checkpoints (no biases at all).
    for key in ("include_bias", "bias_for_layer_norm"):
        if cfg.get(key):
            raise NotImplementedError(f"config.json: LLaDA {key}=true is not supported")
    if cfg.get("layer_norm_with_affine") is False:
        raise NotImplementedError("config.json: LLaDA layer_norm_with_affine=false is not supported")
    d_model = _require(cfg, "d_model", int, 1)
    n_heads = _require(cfg, "n_heads", int, 1)
    n_kv = 1 if cfg.get("multi_query_attention") else _as(cfg, "n_kv_heads", int, n_heads, minimum=1)
    mlp = _as(cfg, "mlp_hidden_size", int, minimum=1) or int(_as(cfg, "mlp_ratio", float, 4) * d_model)
    vocab = _as(cfg, "embedding_size", int, minimum=1) or _require(cfg, "vocab_size", int, 1)
    return ModelSpec(
        arch="llada",
        hidden_size=d_model,
        num_layers=_require(cfg, "n_layers", int, 1),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=d_model // n_heads,
        intermediate_size=int(mlp),
        vocab_size=vocab,
        rope_theta=_as(cfg, "rope_theta", float, 10000.0),
        rms_norm_eps=_as(cfg, "rms_norm_eps", float, 1e-5),
        qkv_bias=bool(cfg.get("include_qkv_bias")),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        rope_in_fp32=bool(cfg.get("rope_full_precision", True)),
        logits_shift=0,
        mask_token_id=_require(cfg, "mask_token_id", int),
        eos_token_id=_require(cfg, "eos_token_id", int),
        pad_token_id=_as(cfg, "pad_token_id", int),
        max_position=_as(cfg, "max_sequence_length", int, 4096),
    )


def _dream_spec(cfg: dict) -> ModelSpec:
    if cfg.get("rope_scaling"):
        raise NotImplementedError(f"config.json: Dream rope_scaling={cfg['rope_scaling']!r} is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"config.json: Dream hidden_act={cfg['hidden_act']!r} (only 'silu' is supported)")
    hidden = _require(cfg, "hidden_size", int, 1)
    heads = _require(cfg, "num_attention_heads", int, 1)
    return ModelSpec(
        arch="dream",
        hidden_size=hidden,
        num_layers=_require(cfg, "num_hidden_layers", int, 1),
        num_heads=heads,
        num_kv_heads=_as(cfg, "num_key_value_heads", int, minimum=1) or heads,
        head_dim=_as(cfg, "head_dim", int, minimum=1) or hidden // heads,
        intermediate_size=_require(cfg, "intermediate_size", int, 1),
        vocab_size=_require(cfg, "vocab_size", int, 1),
        rope_theta=_as(cfg, "rope_theta", float, 10000.0),
        rms_norm_eps=_as(cfg, "rms_norm_eps", float, 1e-6),
        qkv_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope_in_fp32=False,
        logits_shift=1,
        mask_token_id=_require(cfg, "mask_token_id", int),
        eos_token_id=_require(cfg, "eos_token_id", int),
        pad_token_id=_as(cfg, "pad_token_id", int),
        max_position=_as(cfg, "max_position_embeddings", int, 32768),
    )


CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json(file: str) -> dict:
    """A JSON object from ``file``; a missing, unreadable or malformed file is an ``ODBError``
    naming it (a syntax error with its line and column, as ``file:line:col``)."""
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ODBError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ODBError(f"{file}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ODBError(f"{file}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise ODBError(f"{file}: expected a JSON object, found a {type(value).__name__}")
    return value


def read_config(path: str) -> dict:
    """The checkpoint directory's config.json; a path that is not a checkpoint directory is an
    ``ODBError`` naming it."""
    if not os.path.isdir(path):
        what = "no such directory" if not os.path.exists(path) else "not a directory"
        raise ODBError(f"{path}: {what} (a checkpoint is a directory holding {CONFIG_FILE} and {SINGLE_FILE})")
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ODBError(f"{path}: not a checkpoint directory (no {CONFIG_FILE})")
    return read_json(file)


def load_spec(path: str) -> ModelSpec:
    """``ModelSpec`` of a checkpoint directory; errors name its config.json by path."""
    file = os.path.join(path, CONFIG_FILE)
    cfg = read_config(path)
    try:
        return ModelSpec.from_config(cfg)
    except (ValueError, NotImplementedError) as e:
        msg = str(e)
        msg = file + msg[len(CONFIG_FILE):] if msg.startswith(CONFIG_FILE) else f"{file}: {msg}"
        raise (ODBError if isinstance(e, ValueError) else NotImplementedError)(msg) from None


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ODBError(f"{index}: no 'weight_map' (tensor name -> file)")
        files = [os.path.join(path, f) for f in sorted(set(map(str, weight_map.values())))]
        for file in files:
            if not os.path.isfile(file):
                raise ODBError(f"{file}: missing (listed in {index})")
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return [single]
    raise ODBError(f"{path}: no weights (no {SINGLE_FILE} or {INDEX_FILE})")


def safetensors_header(file: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a .safetensors file, read from its header alone, after checking
    that the file is whole: the header (8-byte little-endian length, then JSON) describes exactly
    the bytes that follow it. A truncated or foreign file is an ``ODBError`` naming it."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            raise ODBError(f"{file}: truncated or not a safetensors file ({size} bytes, too few for its header)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        header.pop("__metadata__", None)
        shapes = {name: tuple(int(n) for n in entry["shape"]) for name, entry in header.items()}
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ODBError(f"{file}: not a safetensors file (its header is not a tensor table)") from None
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "longer than its header describes"
        raise ODBError(f"{file}: {state}: {size} bytes, its header describes {8 + length + end} "
                       "(an interrupted download or copy?)")
    return shapes


def check_weights(path: str, spec: ModelSpec) -> None:
    """Check a checkpoint's weights against its config.json before any tensor is read: every
    file whole, every tensor the config implies present with its shape, no other tensor. The
    first fault is an ``ODBError`` naming the file and tensor (and the count of the others)."""
    config = os.path.join(path, CONFIG_FILE)
    want = expected_official_shapes(spec)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in safetensors_files(path):
        for name, shape in safetensors_header(file).items():
            found[name] = (file, shape)
    wrong = [n for n, (_, shape) in found.items() if n in want and shape != tuple(want[n])]
    if wrong:
        file, shape = found[wrong[0]]
        raise ODBError(f"{file}: tensor {wrong[0]} has shape {list(shape)}, {config} implies {list(want[wrong[0]])}"
                       f"{_others(wrong)}: the config's sizes do not match the weights")
    missing = sorted(set(want) - set(found))
    if missing:
        raise ODBError(f"{path}: missing tensor {missing[0]}{_others(missing)} that {config} implies "
                       f"({spec.num_layers} layers): the config's sizes do not match the weights")
    unexpected = sorted(set(found) - set(want))
    if unexpected:
        raise ODBError(f"{found[unexpected[0]][0]}: unexpected tensor {unexpected[0]}{_others(unexpected)} for the "
                       f"{spec.arch} model {config} describes ({spec.num_layers} layers)")


def _others(names: list) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def iter_official_tensors(path: str) -> Iterable[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def expected_official_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes an official checkpoint of this spec holds (models.md 2.2 / 4.2)."""
    d, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    q = spec.num_heads * spec.head_dim
    internal: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, d), "model.norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        internal["lm_head.weight"] = (spec.vocab_size, d)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        internal.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (spec.intermediate_size, d),
            p + "mlp.up_proj.weight": (spec.intermediate_size, d),
            p + "mlp.down_proj.weight": (d, spec.intermediate_size),
        })
        if spec.qkv_bias:
            internal.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                             p + "self_attn.v_proj.bias": (kv,)})
    return {internal_to_official(spec.arch, k): v for k, v in internal.items()}


@dataclass(frozen=True)
class SpecialTokens:
    """Ids the decoder needs, all read from the checkpoint (config and tokenizer), never hard-coded."""

    mask_id: int
    eos_id: int
    end_ids: tuple[int, ...]  # every id that ends a response: EOS, end-of-turn (EOT / im_end)
    pad_id: int


# Turn-end tokens by their text: LLaDA's <|eot_id|>, Dream/Qwen's <|im_end|>. Looked up in the
# tokenizer so their ids are whatever the checkpoint says.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


def special_tokens(spec: ModelSpec, tokenizer=None, generation_config: dict | None = None) -> SpecialTokens:
    ends = [spec.eos_token_id]
    gen_eos = (generation_config or {}).get("eos_token_id")
    if gen_eos is not None:
        ends += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ends.append(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        ends += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab]
    ends = tuple(dict.fromkeys(int(e) for e in ends))
    if spec.mask_token_id in ends:
        raise ValueError(f"mask_token_id {spec.mask_token_id} is also an end-of-sequence id")
    pad = spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_id
    return SpecialTokens(mask_id=spec.mask_token_id, eos_id=spec.eos_token_id, end_ids=ends, pad_id=int(pad))
