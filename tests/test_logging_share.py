"""The plugin's loggers print where vLLM's do (vllm_odb.share_vllm_logging)."""

from __future__ import annotations

import logging

import vllm_odb


def test_our_loggers_use_vllms_handlers_and_level(monkeypatch):
    ours, theirs = logging.getLogger("vllm_odb"), logging.getLogger("vllm")
    handler = logging.StreamHandler()
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "propagate", True)
    monkeypatch.setattr(theirs, "handlers", [handler])
    level = ours.level
    theirs_level = theirs.level
    try:
        theirs.setLevel(logging.INFO)
        vllm_odb.share_vllm_logging()
        assert ours.handlers == [handler] and ours.level == logging.INFO and not ours.propagate
        assert logging.getLogger("vllm_odb.engine.model_state").isEnabledFor(logging.INFO)
    finally:
        ours.setLevel(level)
        theirs.setLevel(theirs_level)


def test_an_applications_own_handlers_are_kept(monkeypatch):
    ours, theirs = logging.getLogger("vllm_odb"), logging.getLogger("vllm")
    mine = logging.NullHandler()
    monkeypatch.setattr(ours, "handlers", [mine])
    monkeypatch.setattr(theirs, "handlers", [logging.StreamHandler()])
    vllm_odb.share_vllm_logging()
    assert ours.handlers == [mine]
