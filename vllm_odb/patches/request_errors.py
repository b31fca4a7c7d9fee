"""Patch: a request the worker failed ends with an error (``Scheduler.update_from_output`` in
vllm/v1/core/sched/scheduler.py, 0.26.0).

Our sampler fails one request whose step cannot be used (non-finite logits; an exception in that
request's own part of the step) and keeps decoding the others (engine/sampler.py). The scheduler
must then end that request. vLLM 0.26 has one per-request signal from the model runner to the
scheduler that crosses process boundaries (tensor-parallel workers): ``ModelRunnerOutput
.num_nans_in_logits``, request id -> NaN count of its logits (vLLM's own sampler fills it only with
``VLLM_COMPUTE_NANS_IN_LOGITS=1``, for statistics). On our engine the sampler is ours and reports a
failed request there (1) every step the request is still in the batch. This wrapper hands those
requests to the scheduler's own per-request error path: the set ``update_from_output`` finishes
with ``RequestStatus.FINISHED_ERROR`` (vLLM fills it with requests whose grammar failed to
compile). So the request's KV blocks are freed, its client gets ``finish_reason="error"`` (HTTP
500 "Internal server error", or an error event in a stream), vLLM's
``vllm:request_success_total{finished_reason="error"}`` counts it, and the other requests and the
engine go on. Other models: vLLM's code unchanged.
"""

from __future__ import annotations

NAME = "request_errors"


def failed_requests(model_runner_output) -> list[str]:
    """Ids of the requests our sampler reported failed in this output."""
    nans = getattr(model_runner_output, "num_nans_in_logits", None) or {}
    return [req_id for req_id, n in nans.items() if n > 0]


def wrap(original):
    def update_from_output(self, scheduler_output, model_runner_output):
        ours = self.__dict__.get("_odb_model")
        if ours is None:
            from vllm_odb.patches import is_odb_model

            ours = self.__dict__["_odb_model"] = is_odb_model(self.vllm_config.model_config.hf_config)
        if ours:
            failed = failed_requests(model_runner_output)
            if failed:  # finished with FINISHED_ERROR by vLLM's own code (a finished one is skipped)
                self.grammar_compile_error_reqs.update(failed)
        return original(self, scheduler_output, model_runner_output)

    update_from_output._odb_patched = True
    return update_from_output


def apply() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_odb.patches import install

    install(Scheduler, "update_from_output", wrap)
