"""The worked suite (tiny/worked.py), its verifier, the tiny formats' tokenizer and the oracle."""

from __future__ import annotations

import random
import re
import statistics

import numpy as np
import pytest
import torch

from vllm_odb.tiny.formats import FORMATS, build_tokenizer
from vllm_odb.tiny.oracle import Oracle, answer_lattice, decode
from vllm_odb.tiny.worked import TASKS, Step, check, make_suite, score, step_renderings


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("llada")


def test_suite_is_seeded_and_balanced():
    a, b, c = make_suite(0, 100), make_suite(0, 100), make_suite(1, 100)
    assert [e.prompt for e in a] == [e.prompt for e in b] and [e.answer for e in a] == [e.answer for e in b]
    assert [e.prompt for e in a] != [e.prompt for e in c]
    assert {e.task for e in a} == set(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        make_suite(0, 3, ("chain", "poetry"))


def test_answers_are_long_worked_solutions(tok):
    """Answers of 60-400 tokens, a mean of 150-250 (research/dynamics.md: LLaDA's GSM8K answers
    run ~230-270 tokens at gen 512), and at most 400 so they fit a 512 canvas with room."""
    suite = make_suite(3, 500)
    lengths = [len(ids) for ids in tok([e.answer for e in suite], add_special_tokens=False)["input_ids"]]
    assert 60 <= min(lengths) and max(lengths) <= 400
    assert 150 <= statistics.mean(lengths) <= 250
    for task in TASKS:  # the number of steps depends on the problem
        assert len({len(e.steps) for e in suite if e.task == task}) > 3


def test_every_wording_passes_the_verifier_and_wordings_vary():
    rng = random.Random(0)
    for e in make_suite(2, 60):
        texts = {e.render(rng) for _ in range(6)}
        assert len(texts) > 1, e.task  # the wording is not fixed by the prompt
        for t in texts:
            assert check(t, e) == {"final": True, "steps": True}, (e.task, t)


def test_step_renderings_enumerate_the_distribution():
    step = Step(("[a|b] x.", " y[| z]."))
    rend = step_renderings(step)
    assert rend == pytest.approx({"a x.": 0.25, "b x.": 0.25, " y.": 0.25, " y z.": 0.25})
    for e in make_suite(4, 20):
        for s in e.steps:
            assert sum(step_renderings(s).values()) == pytest.approx(1.0)


def _mutate_number(text: str, which: int) -> str:
    import re

    nums = list(re.finditer(r"\d+", text))
    m = nums[which]
    return text[:m.start()] + str(int(m.group()) + 1) + text[m.end():]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_verifier_rejects_wrong_answers_and_wrong_steps(task):
    e = next(x for x in make_suite(6, 20) if x.task == task)
    assert score(e.answer, e)
    if task == "chain":  # the final answer is a box
        end = e.truth[0]
        other = next(b for b in e.truth[1] if b != end)
        assert not check(e.answer[:e.answer.rindex(end)] + other + ".", e)["final"]
    else:
        assert not check(_mutate_number(e.answer, -1), e)["final"]  # the final answer
    last = " there are" if task == "tally" else " The answer is"
    assert not score(e.answer.rsplit(last, 1)[0], e)  # no final answer
    if task == "chain":  # a wrong box on the way (in an example whose wording ends a step on it)
        e = next(x for x in make_suite(6, 100) if x.task == task and f"the {x.truth[1][3]} box." in x.answer)
        path = e.truth[1]
        wrong = e.answer.replace(f"the {path[3]} box.", f"the {path[5]} box.", 1)
        assert check(wrong, e) == {"final": True, "steps": False}
    elif task in ("shop", "story"):  # a wrong intermediate result, the final answer kept
        import re

        m = re.search(r"(=|is|which is|that is) (\d+)", e.answer)
        bad = e.answer[:m.start(2)] + str(int(m.group(2)) + 1) + e.answer[m.end(2):]
        assert check(bad, e) == {"final": True, "steps": False}
    elif task == "tally":  # a wrong item index; a wrong count restated in a later step, summary kept
        bad = e.answer.replace(" 1 ", " 2 ", 1)
        assert bad != e.answer and not score(bad, e)
        import re

        steps = list(re.finditer(r"([Ii]tem \d+[^.]*?)(\d+) (\w+)", e.answer))
        m = steps[len(steps) // 2]  # a step's first restated count
        bad = e.answer[:m.start(2)] + str(int(m.group(2)) + 1) + e.answer[m.end(2):]
        assert check(bad, e) == {"final": True, "steps": False}
    elif task == "sort":  # picked out of order
        order = e.truth
        bad = e.answer.replace(f" {order[1]}.", " 100.", 1)
        assert check(bad, e)["steps"] is False


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tokenizer_is_byte_level_bpe_with_word_tokens(fmt, tok):
    t = build_tokenizer(fmt)
    for text in ("Count each kind of fruit: apple, pear.", "héllo wörld ✓ 12345 <b>\n\tx", ""):
        assert t.decode(t(text, add_special_tokens=False)["input_ids"]) == text  # lossless, any text
    words = " The card in the amber box says jade, so we open the jade box. The answer is 137."
    ids = t(words, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words.split()) + 3  # one token a word, and one each for ',' and the two '.'
    base = t.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert base == tok.backend_tokenizer.get_vocab(with_added_tokens=False)  # one BPE, the formats' specials on top
    # the chat templates and special tokens: tests/test_suite_cli.py, for both suites' tokenizers


def test_a_rendering_tokenizes_as_its_steps_do(tok):
    """The oracle's lattice relies on step boundaries being token boundaries."""
    rng = random.Random(1)
    for e in make_suite(8, 25):
        parts = [s.render(rng) for s in e.steps]
        whole = tok("".join(parts), add_special_tokens=False)["input_ids"]
        assert whole == [i for p in tok(parts, add_special_tokens=False)["input_ids"] for i in p]


# ---------------------------------------------------------------------------------------- oracle

END, FILL, V = 8, 9, 10


def _brute_marginals(lattice, g, committed):
    """Every rendering consistent with ``committed``, weighted: the posterior by enumeration."""
    import itertools

    dist = np.zeros((g, V))
    for combo in itertools.product(*lattice):
        toks = [t for alt, _ in combo for t in alt] + [END]
        if len(toks) > g:
            continue
        canvas = toks + [FILL] * (g - len(toks))
        if any(c >= 0 and c != x for c, x in zip(committed, canvas)):
            continue
        w = float(np.prod([p for _, p in combo]))
        dist[np.arange(g), canvas] += w
    dist /= dist[0].sum()
    return dist.argmax(1), dist.max(1)


def test_oracle_marginals_equal_enumeration():
    lattice = [[((1,), 0.5), ((1, 2), 0.5)], [((3,), 1.0)], [((4, 5), 0.25), ((6,), 0.75)]]
    g = 8
    oracle = Oracle(lattice, g, END, FILL)
    for committed in ([-1] * g, [1, 2] + [-1] * 6, [-1, -1, 3] + [-1] * 5, [-1] * 4 + [END] + [-1] * 3):
        c = np.array(committed)
        x0, conf = oracle.marginals(c, V)
        bx0, bconf = _brute_marginals(lattice, g, committed)
        assert np.allclose(conf, bconf) and (x0[bconf < 0.99] == bx0[bconf < 0.99]).all()
    with pytest.raises(ValueError, match="fit no rendering"):
        oracle.marginals(np.array([7] + [-1] * 7), V)


def test_oracle_decoding_commits_the_determined_and_forces_the_wording():
    fixed = [[((1, 2, 3), 1.0)], [((4, 5), 1.0)]]
    d = decode(Oracle(fixed, 8, END, FILL), V, block=8)
    assert d.nfe == 1 and d.response == 5 and d.commits == [[8]]  # all determined: one forward
    branching = [[((1,), 0.5), ((2, 7), 0.5)], [((3, 3), 1.0)]]
    d = decode(Oracle(branching, 8, END, FILL), V, block=8)
    assert d.commits[0][0] < 8 and d.nfe >= 2  # the wording must be chosen first


def test_oracle_on_the_suite_decodes_a_few_tokens_per_forward(tok):
    """The suite admits about 3 tokens per forward at threshold 0.9 for an ideal model (the
    yardstick is LLaDA's ~2.8 on GSM8K), and a block's first forward commits a minority of it."""
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    resp, nfe, first = 0, 0, []
    for e in make_suite(0, 10):
        d = decode(Oracle(answer_lattice(e, tok), 512, eot, eos), len(tok))
        resp += d.response
        nfe += d.nfe
        first += [steps[0] / 32 for steps in d.commits[:d.response // 32]]
    assert 2.5 <= resp / nfe <= 4.5
    assert statistics.mean(first) < 0.35


@pytest.mark.slow
def test_trainer_writes_an_official_layout_checkpoint_and_continues_one(tmp_path):
    """Two steps of the worked-suite trainer on the CPU, then two more from its weights (--init):
    the checkpoint loads, names its suite, and the second run starts from the first's weights."""
    import json

    import torch

    from vllm_odb.reference.model import load_model
    from vllm_odb.tiny import suites
    from vllm_odb.tiny.train import main

    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--format", "dream", "--steps", "2", "--pool", "64", "--tokens-per-batch", "1024", "--device", "cpu"]
    assert main([*common, "--out", str(a)]) == 0
    assert suites.suite_name(str(a)) == "worked"
    assert json.loads((a / "config.json").read_text())["architectures"] == ["DreamModel"]
    first = load_model(str(a))
    assert main([*common, "--out", str(b), "--init", str(a), "--lr", "0"]) == 0  # lr 0: the weights stay
    second = load_model(str(b))
    for (n, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_trainer_saves_partial_checkpoints_on_the_way(tmp_path, monkeypatch):
    """--save-every: a long device run leaves a loadable checkpoint if its call is cut off; the
    partial saves say so and the last save does not."""
    from vllm_odb.tiny import train

    saved = []
    real = train._save
    monkeypatch.setattr(train, "_save", lambda model, tok, cfg, args, rec: (saved.append(rec), real(model, tok, cfg, args, rec)))
    argv = ["--format", "llada", "--steps", "3", "--pool", "64", "--tokens-per-batch", "1024", "--device", "cpu",
            "--out", str(tmp_path / "c"), "--save-every", "1e-9"]
    assert train.main(argv) == 0
    assert [(r["steps_done"], r.get("partial", False)) for r in saved] == [(1, True), (2, True), (3, False)]


def test_tight_batches_spend_their_positions_on_answers():
    """--tight-canvas: a tight batch's rows end their answer inside the row, at most TIGHT_FILL
    positions before its end (one EOS at least), widths in blocks of 32; every batch tight puts
    less of a batch in the EOS fill, and more masked positions in answers, than none (the drawn
    canvases of runs v1-v8: --tight-canvas 0 replays them)."""
    import argparse

    from vllm_odb.checkpoint import special_tokens
    from vllm_odb.tiny.train import TIGHT_FILL, Batches, _new_model, _parser, encode_pool, fill_share

    args = argparse.Namespace(format="llada", seed=0, device="cpu", tokens_per_batch=8192, init=None, tight_canvas=1.0)
    tok, _, spec, model = _new_model(args)
    pool = encode_pool(tok, "llada", 300, 7, workers=2)
    special = special_tokens(spec, tok)
    tight = Batches(pool, args, special, random.Random(0), 0)
    for _ in range(20):
        x, target, masked, is_pad = tight.draw()
        assert x.shape[1] % 32 == 0
        fill = is_pad.sum(1)
        assert bool((fill >= 1).all()) and bool((fill <= TIGHT_FILL).all()), fill
    shares = {}
    for p in (0.0, 1.0):
        args.tight_canvas = p
        shares[p] = fill_share(Batches(pool, args, special, random.Random(1), 1), 60)
    args.tokens_per_batch = 1024  # 8 rows a batch: a quick forward
    with_loss = fill_share(Batches(pool, args, special, random.Random(2), 2), 1, model.eval(), spec.logits_shift)
    assert with_loss["loss_answer"] > 0 and with_loss["loss_fill"] > 0  # a checkpoint's loss on each kind
    assert shares[1.0]["fill"] < 0.75 * shares[0.0]["fill"]
    assert shares[1.0]["masked_answer"] > 1.2 * shares[0.0]["masked_answer"]
    assert _parser().parse_args(["--format", "llada", "--out", "x"]).tight_canvas == 0.6
    from vllm_odb.tiny.train import main

    assert main(["--format", "llada", "--out", "/nonexistent/x", "--device", "cpu", "--tight-canvas", "1.5"]) == 2


def test_task_weights_set_how_often_each_task_is_trained():
    """--task-weights repeats a task in the cycle make_suite draws from; a bad entry is one line
    naming the knob, exit 2."""
    import collections

    from vllm_odb.tiny.train import main, task_mix

    assert task_mix(None) is None and task_mix("") is None
    mix = task_mix("chain=3,tally=2,sort=0")
    assert collections.Counter(mix) == {"chain": 3, "tally": 2, "shop": 1, "story": 1}
    counts = collections.Counter(e.task for e in make_suite(5, 70, mix))
    assert counts == {"chain": 30, "tally": 20, "shop": 10, "story": 10}
    for bad in ("chain", "chains=2", "chain=x", "chain=0,shop=0,tally=0,sort=0,story=0"):
        with pytest.raises(ValueError, match="--task-weights"):
            task_mix(bad)
    assert main(["--format", "llada", "--out", "/nonexistent/x", "--device", "cpu", "--task-weights", "chain=-1"]) == 2


class _ProbeModel(torch.nn.Module):
    """Stands in for a checkpoint's model: predicts ``truth`` (every position: an oracle) or
    the token at ``copy_from`` of the input (what a copier would), with ``shift`` as Dream's."""

    def __init__(self, truth, shift: int, vocab: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.truth, self.vocab = truth, vocab
        self.spec = type("Spec", (), {"logits_shift": shift})()

    def forward(self, x, pos):
        ids = self.truth[: x.shape[1]]
        if self.spec.logits_shift:  # position i-1 predicts token i
            ids = torch.cat([ids[1:], ids[-1:]])
        return torch.nn.functional.one_hot(ids, self.vocab).float()[None]


@pytest.mark.parametrize("shift", [0, 1])
def test_lookup_probe_counts_every_lookup_and_reads_shifted_logits(tok, shift):
    """The probe masks each looked-up value (chain: every copy; tally: item i's fruit) and reads the
    logit row that predicts it (Dream's one position earlier): an oracle model is right every time,
    a model that predicts the mask is never right."""
    from types import SimpleNamespace

    from vllm_odb.tiny.probe import lookup_probe

    examples = make_suite(3, 4, ("chain", "tally"))
    special = SimpleNamespace(mask_id=tok.mask_token_id, eos_id=tok.eos_token_id)
    for oracle in (True, False):
        right = {"chain": 0, "tally": 0}
        totals = {"chain": 0, "tally": 0}
        for ex in examples:
            prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            answer = tok(ex.answer, add_special_tokens=False)["input_ids"]
            seq = torch.tensor(prompt + answer + [special.eos_id] * 32)
            truth = seq if oracle else torch.full_like(seq, special.mask_id)
            ckpt = SimpleNamespace(tokenizer=tok, special=special, model=_ProbeModel(truth, shift, len(tok)),
                                   encode_chat=lambda p: tok(p, add_special_tokens=False)["input_ids"])
            res = lookup_probe(ckpt, [ex], max_items=5)
            assert res[ex.task]["lookup"][1] == res[ex.task]["copy"][1] == 5  # 5 values probed
            right[ex.task] += res[ex.task]["lookup"][0] + res[ex.task]["copy"][0]
            totals[ex.task] += 10
        assert right == (totals if oracle else {"chain": 0, "tally": 0})


def test_the_frozen_bpe_keeps_every_word_of_the_suite_one_token(tok):
    """The worked suite's BPE is a file (tiny/formats.FROZEN_BPE), so checkpoints keep their token
    ids across changes of the suite's text; every word the suite writes must still be one token."""
    import random

    from vllm_odb.tiny.formats import TOKENIZER_SEED

    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    pre = tok.backend_tokenizer.pre_tokenizer
    rng = random.Random(TOKENIZER_SEED)
    # 1000 examples of a seed the BPE never saw (its corpus: 20,000 of TOKENIZER_SEED, 6 s to build)
    texts = [t for e in make_suite(TOKENIZER_SEED + 1, 1000) for t in (e.prompt, e.answer, e.render(rng))]
    words = {w for text in texts for w, _ in pre.pre_tokenize_str(text)}
    missing = sorted(w for w in words if w not in vocab)
    assert not missing, f"words the frozen BPE splits (relearn it with formats.learn_bpe, then train from scratch): {missing[:20]}"


def test_chain_cards_follow_the_path_with_others_between():
    """chain's prompt lists the path's cards in path order; off-path cards sit anywhere between."""
    for ex in make_suite(4, 40, ("chain",)):
        path = ex.truth[1]
        cards = re.findall(r"The (\w+) box has a card saying (\w+)\.", ex.prompt)
        on_path = [c for c in cards if c[0] in path]
        assert on_path == list(zip(path, path[1:]))
        assert len(cards) > len(on_path)  # at least one card off the path
