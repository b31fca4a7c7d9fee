"""``python -m vllm_odb.eval``: lm-eval's command line with the ``odb_suite`` task and the
``odb-reference`` model.

    python -m vllm_odb.eval --print-include-path        # the directory for lm-eval's --include_path
    python -m vllm_odb.eval --model local-chat-completions \\
        --model_args model=checkpoints/tiny-llada,base_url=http://127.0.0.1:8000/v1/chat/completions \\
        --tasks odb_suite --apply_chat_template --limit 100
    python -m vllm_odb.eval --model odb-reference --model_args pretrained=checkpoints/tiny-llada,method=odb \\
        --tasks odb_suite --apply_chat_template --limit 20   # the reference engine, no server

Any other arguments go to lm-eval (``lm_eval --help``) as they are, with ``--include_path`` added
when not given. Plain ``lm_eval ... --include_path $(python -m vllm_odb.eval --print-include-path)``
runs the task as well; only ``odb-reference`` needs this entry point (lm-eval's own command line
does not import it).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm_odb.eval import include_path

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--print-include-path" in argv:
        print(include_path())
        return 0
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lm-eval is not installed; pip install 'vllm-odb[eval]' (lm-eval 0.4.x)", file=sys.stderr)
        return 2
    import vllm_odb.eval.reference_lm  # noqa: F401  registers odb-reference

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv) and any(
            a.startswith("--") for a in argv):
        argv += ["--include_path", include_path()]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
