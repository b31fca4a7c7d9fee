"""lm-eval (0.4.x) support: the synthetic suite as an lm-eval task, and a CPU model for it.

- ``tasks/odb_suite.yaml``: the ``odb_suite`` task, a ``generate_until`` task whose documents are
  the held-out prompts ``python -m vllm_odb.bench quality --seed S --limit N`` decodes and whose
  metrics (``accuracy``, ``final_accuracy``) are that command's, from the same verifier
  (suite_task.py). Point lm-eval at it with ``--include_path $(python -m vllm_odb.eval
  --print-include-path)``.
- ``reference_lm.py``: ``odb-reference``, an lm-eval model that answers with the reference engine
  (CPU or GPU, no server), for checking the task without vLLM.
- ``python -m vllm_odb.eval [lm-eval arguments]``: lm-eval's own command line with the task's
  include path added and ``odb-reference`` registered (__main__.py).

lm-eval is an optional dependency (``pip install 'vllm-odb[eval]'``); nothing here imports it at
package import.
"""

from __future__ import annotations

from pathlib import Path

TASK = "odb_suite"


def include_path() -> str:
    """The directory to pass to lm-eval's ``--include_path`` (holds ``odb_suite.yaml``)."""
    return str(Path(__file__).resolve().parent / "tasks")
