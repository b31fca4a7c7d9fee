"""lm-eval hooks of the ``odb_suite`` task (odb_suite.yaml): documents, prompt and metric, all
from vllm_odb.eval.suite_task (the suite and verifier ``bench quality`` uses)."""

from vllm_odb.eval import suite_task


def suite_dataset(**metadata):
    """lm-eval's ``custom_dataset``: called with the task's metadata (``--metadata`` and the
    model's arguments); one ``test`` split."""
    import datasets

    return {"test": datasets.Dataset.from_list(suite_task.suite_docs(**metadata))}


def doc_to_text(doc: dict) -> str:
    """The suite's prompt, unchanged: the user turn of the chat (use ``--apply_chat_template``:
    the checkpoints answer in their chat format)."""
    return doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return suite_task.score(doc, results[0])
