"""The reference generate loop: block-wise masked-diffusion decoding in plain PyTorch.

It is the oracle the vLLM engine is checked against and the research-code-equivalent baseline of
the benchmarks, so it stays plain. One step, top to bottom:

    forward (no cache | refresh that rebuilds the cache | cached step on the block)
      -> logits of the block's canvas positions (Dream: from the position before, see below)
      -> policy decides (policies.decide)
      -> commit into the canvas

Batches: prompts are left-padded; padded keys are masked and positions count real tokens only,
so a request decodes the same alone and in a batch. Dream predicts token i from position i-1, so
for Dream a cached step's query window starts one position before the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_odb.checkpoint import SpecialTokens
from vllm_odb.policies import DecodeConfig, decide, dream_quota, linear_quota
from vllm_odb.reference.model import DiffusionLM


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # the decoded canvas of each request (gen_length ids)
    nfe: list[int]  # forwards each request took part in
    forwards: int  # forwards of the batch
    stats: dict = field(default_factory=dict)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] ids and real-token mask, prompts aligned to the right."""
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        real[i, width - len(p):] = True
    return ids, real


@torch.no_grad()
def generate(
    model: DiffusionLM,
    prompts: list[list[int]],
    cfg: DecodeConfig,
    special: SpecialTokens,
    generator: torch.Generator | None = None,
    on_forward: Callable[[], None] | None = None,
) -> GenerateOutput:
    device = next(model.parameters()).device
    shift = model.spec.logits_shift
    prompt_ids, prompt_real = left_pad(prompts, special.pad_id, device)
    batch, plen = prompt_ids.shape
    glen, blen = cfg.gen_length, cfg.block_length
    if plen + glen > model.spec.max_position:
        raise ValueError(f"prompt ({plen}) + gen_length ({glen}) exceeds the model's max_position ({model.spec.max_position})")
    x = torch.cat([prompt_ids, torch.full((batch, glen), special.mask_id, dtype=torch.long, device=device)], 1)
    key_mask = torch.cat([prompt_real, torch.ones((batch, glen), dtype=torch.bool, device=device)], 1)
    pos = (key_mask.long().cumsum(1) - 1).clamp_min(0)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    forwards = 0

    for b in range(cfg.num_blocks):
        s, e = plen + b * blen, plen + (b + 1) * blen
        q0 = s - shift  # first query row of a cached step (Dream reads the block from one earlier)
        masked = x[:, s:e] == special.mask_id
        quota = linear_quota(masked.sum(1), cfg.steps_per_block) if cfg.schedule == "linear" else None
        cache = None
        step = 0
        while masked.any():
            if cfg.rule == "quota" and step >= cfg.steps_per_block:
                raise RuntimeError("quota schedule ended with masked positions left")
            if cfg.cache == "none":
                logits = model(x, pos, key_mask)[:, q0:e - shift]
            elif step == 0:  # refresh: one full forward rebuilds the cache and takes the first step
                logits, kv = model(x, pos, key_mask, return_kv=True)
                logits = logits[:, q0:e - shift]
                cache = kv if cfg.cache == "dual" else [(k[:, :, :q0], v[:, :, :q0]) for k, v in kv]
            elif cfg.cache == "dual":  # block rows only; prefix and suffix keys from the cache
                logits = model(x[:, q0:e], pos[:, q0:e], key_mask, past=cache, splice=(q0, e))[:, :blen]
            else:  # prefix cache: block and suffix rows against the cached prefix
                logits = model(x[:, q0:], pos[:, q0:], key_mask, past=cache)[:, :blen]
            forwards += 1
            if on_forward is not None:
                on_forward()
            if cfg.rule == "quota":
                step_quota = quota[:, step] if quota is not None else torch.full(
                    (batch,), dream_quota(masked.sum().item() / batch, step, cfg.steps_per_block), device=device)
            else:
                step_quota = None
            x0, _, commit = decide(logits, masked, cfg, special.mask_id, step_quota, generator)
            nfe += masked.any(1)
            x[:, s:e] = torch.where(commit, x0, x[:, s:e])
            masked &= ~commit
            step += 1

    canvas = x[:, plen:].tolist()
    return GenerateOutput(tokens=canvas, nfe=nfe.tolist(), forwards=forwards)


def response_ids(canvas: list[int], special: SpecialTokens) -> list[int]:
    """The response: the canvas up to (not including) the first end-of-sequence id."""
    ends = set(special.end_ids)
    for i, t in enumerate(canvas):
        if t in ends:
            return canvas[:i]
    return canvas
