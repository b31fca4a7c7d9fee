"""``python -m vllm_odb.tiny.probe``: can a worked-suite checkpoint look a value up in its prompt?

A diagnostic for training, with teacher forcing: the true answer sits on the canvas, one looked-up
value is masked, and one forward predicts it.

- ``chain``: hop k's box name, masked at every copy of it in the answer (the card's value and
  the next box), so only the prompt's cards can tell it ("lookup"); then only its first copy
  masked, the others visible ("copy").
- ``tally``: item i's fruit, which the answer names once: the prompt's numbered list alone tells it.

A model that decodes these tasks right must do the lookup. A model that only copies values from
its own answer scores well on "copy" and near zero on "lookup".
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LOOKUP_TASKS = ("chain", "tally")


def _sublist(seq: list[int], pattern: list[int], start: int = 0) -> int | None:
    for j in range(start, len(seq) - len(pattern) + 1):
        if seq[j:j + len(pattern)] == pattern:
            return j
    return None


def _targets(ex, answer: list[int], tokenizer, max_items: int) -> list[tuple[int, list[int]]]:
    """(token id, answer columns to mask) per looked-up value of ``ex``."""
    def word(w: str) -> int | None:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None

    out = []
    if ex.task == "chain":
        for box in ex.truth[1][1:max_items + 1]:
            vid = word(box)
            cols = [j for j, t in enumerate(answer) if t == vid]
            if vid is not None and cols:
                out.append((vid, cols))
    elif ex.task == "tally":
        for i, fruit in enumerate(ex.truth[1][:max_items], 1):
            vid = word(fruit)
            at = None
            for head in (" Item", "Item", " item"):  # "Item 3 is ...", "Then item 3 is ..."
                at = _sublist(answer, tokenizer(f"{head} {i}", add_special_tokens=False)["input_ids"])
                if at is not None:
                    break
            col = None if at is None or vid is None else next((j for j in range(at, len(answer)) if answer[j] == vid), None)
            if col is not None:
                out.append((vid, [col]))
    return out


@torch.no_grad()
def lookup_probe(ckpt, examples, max_items: int = 6, fill: int = 32) -> dict:
    """Per task: looked-up values predicted right with every copy masked ("lookup") and with only
    the first copy masked ("copy"), as [right, total]."""
    tok, special = ckpt.tokenizer, ckpt.special
    shift = ckpt.model.spec.logits_shift
    result = {t: {"lookup": [0, 0], "copy": [0, 0]} for t in LOOKUP_TASKS}
    device = next(ckpt.model.parameters()).device
    for ex in examples:
        if ex.task not in LOOKUP_TASKS:
            continue
        prompt = ckpt.encode_chat(ex.prompt)
        answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
        seq = torch.tensor(prompt + answer + [special.eos_id] * fill, device=device)
        for vid, cols in _targets(ex, answer, tok, max_items):
            for kind, masked in (("lookup", cols), ("copy", cols[:1])):
                pos = torch.tensor(masked, device=device) + len(prompt)
                x = seq.clone()
                x[pos] = special.mask_id
                logits = ckpt.model(x[None], torch.arange(len(x), device=device)[None])[0]
                pred = logits[pos - shift].argmax(-1)  # Dream: position i-1 predicts token i
                result[ex.task][kind][0] += int((pred == vid).all())
                result[ex.task][kind][1] += 1
    return result


def main(argv=None) -> int:
    from vllm_odb.reference.loader import load_checkpoint
    from vllm_odb.tiny import suites

    ap = argparse.ArgumentParser(prog="python -m vllm_odb.tiny.probe", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a worked-suite checkpoint directory")
    ap.add_argument("--limit", type=int, default=20, help="examples of each lookup task")
    ap.add_argument("--seed", type=int, default=0, help="suite seed (held out from training)")
    ap.add_argument("--max-items", type=int, default=6, help="values probed per example")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if suites.suite_name(args.model) != "worked":
        print(f"error: {args.model} was not trained on the worked suite (its lookups are what this probes)",
              file=sys.stderr)
        return 2
    ckpt = load_checkpoint(args.model, device=args.device)
    suite = suites.for_checkpoint(args.model).make_suite(args.seed, 2 * args.limit, LOOKUP_TASKS)
    result = lookup_probe(ckpt, suite, args.max_items)
    print(json.dumps({"model": args.model, "seed": args.seed, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
