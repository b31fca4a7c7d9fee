"""One exception for input vllm-odb refuses, and how the command lines report it.

``ODBError`` is a ``ValueError`` whose message is one line naming the file or the knob at fault: a
checkpoint directory that is not one, weights missing, truncated or of other sizes than the
config's, a malformed JSON file (with its line and column), an empty prompt, a decoding knob that
is bad or that the chosen method would ignore. Being a ``ValueError`` it needs nothing more to
reach the user cleanly:

- the command lines (``python -m vllm_odb.generate``, ``python -m vllm_odb.bench ...``) print
  ``error: <message>`` on stderr and exit 2 (``cli_error`` below), no traceback;
- vLLM 0.26's OpenAI server answers a ``ValueError`` raised while a request is validated with
  HTTP 400 (``create_error_response`` in ``vllm/entrypoints/serve/utils/error_response.py`` maps
  ``ValueError`` to ``BadRequestError``), and ``LLM(...).generate`` raises it to the caller.

``DecodeConfig``'s own checks raise plain ``ValueError`` with the same one-line form (the policies
import nothing from here); the command lines report both alike.
"""

from __future__ import annotations

import sys

# What a command line reports as one line: refused input, and checkpoint features vllm-odb does
# not implement (``NotImplementedError`` naming the config key, from vllm_odb.checkpoint).
USER_ERRORS = (ValueError, NotImplementedError)
EXIT_USAGE = 2  # argparse's exit status for a bad command line; ours for bad input too


class ODBError(ValueError):
    """Input vllm-odb refuses; the message is one line naming the file or knob at fault."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (messages from other libraries may span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def cli_error(exc: BaseException, file=None) -> int:
    """Print ``error: <message>`` on stderr (one line) and return the exit status, 2."""
    print(f"error: {one_line(exc)}", file=file or sys.stderr)
    return EXIT_USAGE
