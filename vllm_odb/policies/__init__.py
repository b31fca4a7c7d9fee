"""Decoding policies in pure torch: batched tensors in, tensors out, no engine knowledge."""

from vllm_odb.policies.commit import commit_best, commit_factor, commit_threshold, commit_topk
from vllm_odb.policies.confidence import predict
from vllm_odb.policies.config import METHODS, DecodeConfig
from vllm_odb.policies.schedule import dream_quota, linear_quota
from vllm_odb.policies.step import decide

__all__ = ["DecodeConfig", "METHODS", "commit_best", "commit_factor", "commit_threshold", "commit_topk",
           "decide", "dream_quota", "linear_quota", "predict"]
