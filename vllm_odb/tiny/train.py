"""Train a tiny LLaDA- or Dream-format checkpoint on the synthetic suite (masked-diffusion SFT).

    python -m vllm_odb.tiny.train --format llada --out checkpoints/tiny-llada
    python -m vllm_odb.tiny.train --format dream --out checkpoints/tiny-dream

The response canvas is ``answer <end-of-turn> <EOS> ... <EOS>`` up to the canvas length, as in
LLaDA's SFT, so the model learns where an answer ends and to fill the rest with EOS. Canvases run
from 128 to 1024 positions, so EOS is predicted confidently far past an answer (what adaptive
length prediction reads) and near it. Each example's answer is one wording of its worked solution
(tiny/worked.py): across the pool the model sees every step phrased several ways, and learns the
content as certain and the wording as a distribution. The prompt is never masked. Half of each batch uses LLaDA's i.i.d. masking (ratio t ~ U(0, 1)); the other
half looks like semi-autoregressive decoding (clean prefix, a partly masked 32-token block, fully
masked suffix), the states the block decoders actually visit. Dream is trained with its shifted
objective: the logits at position i-1 predict token i.

Seeded and deterministic up to GPU kernel nondeterminism; ``--steps`` fixes the length of a run
(``--max-minutes`` fits the step count to a time limit once, early, and the log records the
result, so ``--steps N`` replays the run). On CUDA the model is compiled (``--no-compile`` runs it
eager; a compile failure falls back to eager and says so).

Started by ``torchrun`` over several GPUs, the run is data parallel (tiny/parallel.py): each rank
draws its own batches from its own pool, the gradients are averaged, and rank 0 logs and saves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.nn.functional as F

from vllm_odb.checkpoint import ModelSpec, special_tokens
from vllm_odb.reference.model import DiffusionLM, init_weights, save_model
from vllm_odb.tiny.formats import FORMATS, build_tokenizer, model_config, write_generation_config
from vllm_odb.tiny.parallel import Ranks
from vllm_odb.tiny.worked import TASKS, make_suite

SIZES = {  # hidden, layers, heads, kv heads, mlp; even head counts so TP=2 splits them
    "llada": dict(hidden=256, layers=8, heads=4, kv_heads=4, mlp=768),
    "dream": dict(hidden=256, layers=8, heads=4, kv_heads=2, mlp=768),
}
VOCAB_ROWS = 2048  # the tokenizer has about 1770 tokens (tiny/formats.py)
MAX_LEN = 2048
FIT_AT = (40, 140, 600, 2000)  # steps where --max-minutes refits the step count
TRAIN_SEED_OFFSET = 1_000_003  # training examples never come from the evaluation seeds (0..999)
# A tight batch's rows end their answer within this many positions of the row's end (the EOS fill
# after it), as a canvas that ALP has cut does: a block or a few after the answer's.
TIGHT_FILL = 160
# Tight batches by default since session 16 (runs up to v8 had none, and their logs lack the
# argument: replay one with --tight-canvas 0). Measured on a 4k-example pool (fill_share): 47% of a
# batch's positions in the EOS fill and 15% masked answer positions with none; 32% and 20% at 0.6.
TIGHT_DEFAULT = 0.6


def _suite_texts(job: tuple[int, int, tuple[str, ...] | None]) -> list[tuple[str, str]]:
    seed, n, tasks = job
    return [(e.prompt, e.answer) for e in make_suite(seed, n, tasks)]


def task_mix(text: str | None) -> tuple[str, ...] | None:
    """``--task-weights chain=3,tally=3``: the suite's tasks, each repeated its weight (default 1)
    times, for make_suite to cycle through; None (every task once) without weights."""
    if not text:
        return None
    weights = {t: 1 for t in TASKS}
    for part in text.split(","):
        name, _, w = part.partition("=")
        if name.strip() not in TASKS or not w.strip().isdigit():
            raise ValueError(f"--task-weights: {part!r} is not TASK=N with TASK one of {sorted(TASKS)} and N >= 0")
        weights[name.strip()] = int(w)
    mix = tuple(t for t, w in weights.items() for _ in range(w))
    if not mix:
        raise ValueError("--task-weights: every weight is 0")
    return mix


def encode_pool(tokenizer, fmt: str, n: int, seed: int, workers: int = 8, tasks: tuple[str, ...] | None = None):
    """Tokenize ``n`` suite examples: left-aligned prompts and answers (+ end-of-turn), padded.
    The examples come from ``workers`` suites of seeds ``seed * 1000 + k`` (made in parallel);
    ``tasks`` (task_mix) sets how often each task comes."""
    import multiprocessing

    import numpy as np

    jobs = [(seed * 1000 + k, n // workers + (k < n % workers), tasks) for k in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        texts = [t for chunk in pool.map(_suite_texts, jobs) for t in chunk]
    end_of_turn = FORMATS[fmt][0]["extra"][-1]  # <|eot_id|> / <|im_end|>
    # The chat template around one user turn, rendered once (every prompt is the same shape).
    head, tail = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], add_generation_prompt=True,
                                               tokenize=False).split("\x00")
    p_ids = tokenizer([head + p.strip() + tail for p, _ in texts], add_special_tokens=False)["input_ids"]
    a_ids = tokenizer([a + end_of_turn for _, a in texts], add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id

    def padded(rows):
        out = np.full((len(rows), max(map(len, rows))), pad, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return torch.from_numpy(out)

    return (padded(p_ids), torch.tensor([len(p) for p in p_ids]), padded(a_ids),
            torch.tensor([len(a) for a in a_ids]))


def sample_canvas_length(rng: random.Random) -> int:
    """Mostly canvases of 128-512 positions (the answer a large part of the loss, and the shortest
    ones what ALP's cuts leave), sometimes up to 1024 so that EOS is predicted confidently far
    from the answer. Multiples of 32."""
    r = rng.random()
    if r < 0.7:
        return rng.choice(range(128, 513, 32))
    if r < 0.88:
        return rng.choice(range(544, 769, 32))
    return rng.choice(range(800, 1025, 32))


def make_batch(pool, idx, width, eos_id, mask_id, block, gen: torch.Generator):
    """Rows of one total ``width`` and mixed tasks, with no padding: each prompt starts at
    position 0 and its canvas (answer, end-of-turn, EOS fill) takes the rest of the row, so the
    canvas length varies per row and no attention mask is needed (the GPU runs its flash kernel).
    Returns ids, target, the canvas mask, the masked positions and the EOS-fill positions."""
    P, plen, A, alen = (t[idx] for t in pool)
    b = P.shape[0]
    dev = P.device
    cols = torch.arange(width, device=dev)[None]
    rel = cols - plen[:, None]  # position inside the canvas (negative in the prompt)
    in_canvas = rel >= 0
    prompt_part = P.gather(1, cols.clamp(max=P.shape[1] - 1).expand(b, -1))
    answer_part = A.gather(1, rel.clamp(0, A.shape[1] - 1))
    target = torch.where(in_canvas, torch.where(rel < alen[:, None], answer_part, eos_id), prompt_part)
    is_pad = rel >= alen[:, None]
    # Masking: half i.i.d. with ratio t, half semi-AR (clean prefix, partly masked block, masked suffix).
    t = torch.rand(b, 1, generator=gen, device=dev).clamp_min(1e-3)
    iid = torch.rand(b, width, generator=gen, device=dev) < t
    n_blocks = ((width - plen) // block).clamp_min(1)[:, None]
    # The decoded block is mostly one holding the answer (or the block after it), where the content
    # is learnt; sometimes anywhere in the EOS fill.
    answer_blocks = torch.minimum(n_blocks, alen[:, None] // block + 2)
    span = torch.where(torch.rand(b, 1, generator=gen, device=dev) < 0.8, answer_blocks, n_blocks)
    start = (torch.rand(b, 1, generator=gen, device=dev) * span).floor().long() * block
    semi = ((rel >= start) & (rel < start + block) & iid) | (rel >= start + block)
    use_semi = torch.rand(b, 1, generator=gen, device=dev) < 0.5
    masked = torch.where(use_semi, semi, iid) & in_canvas
    first = plen[:, None] == cols
    masked |= first & ~masked.any(1, keepdim=True)  # at least one masked position per row
    x = torch.where(masked, mask_id, target)
    return x, target, masked, is_pad


def loss_fn(model, shift: int, batch, pad_weight: float) -> torch.Tensor:
    x, target, masked, is_pad = batch
    pos = torch.arange(x.shape[1], device=x.device)[None].expand_as(x)
    logits = model(x, pos)
    if shift:  # Dream: position i-1 predicts token i
        logits, target, masked, is_pad = logits[:, :-1], target[:, 1:], masked[:, 1:], is_pad[:, 1:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    w = masked.float() * torch.where(is_pad, pad_weight, 1.0)
    return (ce.view_as(w) * w).sum() / w.sum()


def _official_tokenizer_class(path: str) -> None:
    """transformers 5 writes its internal class name; the official checkpoints name the fast class."""
    p = os.path.join(path, "tokenizer_config.json")
    with open(p) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(p, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=sorted(SIZES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--tokens-per-batch", type=int, default=65536)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=200_000, help="examples tokenized up front")
    ap.add_argument("--pad-weight", type=float, default=0.3, help="loss weight of EOS fill positions")
    ap.add_argument("--tight-canvas", type=float, default=TIGHT_DEFAULT, metavar="P",
                    help="share of batches whose rows end their answer near the row's end (little EOS fill; "
                         f"see Batches; default {TIGHT_DEFAULT}); 0: every canvas drawn as runs v1-v8 drew them")
    ap.add_argument("--max-minutes", type=float, default=None, help="fit the step count to this many minutes")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--init", help="start from this checkpoint's weights (continue a run) instead of random ones")
    ap.add_argument("--task-weights", metavar="TASK=N,...",
                    help="how often each task comes in training (default: all equally), e.g. chain=3,tally=3")
    ap.add_argument("--save-every", type=float, default=None, metavar="MIN",
                    help="also save the checkpoint every MIN minutes (a long run leaves something if cut off)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="run the model eager on CUDA")
    ap.add_argument("--fill-share", type=int, default=0, metavar="N",
                    help="train nothing: draw N batches as the run would and print where their positions go "
                         "(EOS fill, masked answer and fill positions; fill_share) as JSON")
    return ap


def _new_model(args):
    """The tokenizer, config.json dict, spec and model of a run (``--init``: that checkpoint's weights)."""
    tokenizer = build_tokenizer(args.format)
    config = model_config(args.format, tokenizer, vocab_rows=VOCAB_ROWS, max_len=MAX_LEN, **SIZES[args.format])
    spec = ModelSpec.from_config(config)
    model = DiffusionLM(spec)
    init_weights(model, seed=args.seed)
    if args.init:  # continue a run: the same format and sizes, its weights
        from vllm_odb.reference.model import load_model

        model.load_state_dict(load_model(args.init).state_dict())
    return tokenizer, config, spec, model.to(args.device).train()



class Batches:
    """Training batches from the tokenized pool. Row width = an anchor prompt's length + a canvas
    length; rows whose prompt and answer fit take the rest of the width as canvas. Rows with
    prompts near the anchor get canvases near the drawn length, so every prompt also meets short
    canvases (as ALP's cuts produce).

    With ``--tight-canvas P``, a batch is *tight* with probability P: its width is an anchor
    example's prompt and answer rounded up to the block (plus 0-2 blocks), and its rows are the
    examples that end within ``TIGHT_FILL`` positions of it. Drawn widths put about half of a
    batch's positions in the EOS fill, whose loss is near zero once the model has learnt to end an
    answer; tight batches spend those positions on answers (``fill_share`` measures it)."""

    def __init__(self, pool, args, special, rng: random.Random, seed: int):
        self.pool, self.args, self.special, self.rng = pool, args, special, rng
        self.plen, self.alen = pool[1].cpu(), pool[3].cpu()
        self.fits: dict[int, torch.Tensor] = {}
        self.tight_fits: dict[int, torch.Tensor] = {}
        self.gen = torch.Generator(device=args.device).manual_seed(seed)

    def draw(self):
        if getattr(self.args, "tight_canvas", 0.0) > 0 and self.rng.random() < self.args.tight_canvas:
            return self._tight()
        while True:
            anchor = int(self.plen[self.rng.randrange(len(self.plen))])
            width = -(-(anchor + sample_canvas_length(self.rng)) // 32) * 32
            fits = self.fits.get(width)
            if fits is None:
                fits = self.fits[width] = (self.plen + self.alen < width).nonzero().flatten().to(self.args.device)
            if len(fits):  # else a canvas shorter than every answer of this prompt length: draw again
                break
        return self._rows(fits, width)

    def _tight(self):
        a = self.rng.randrange(len(self.plen))
        width = (-(-int(self.plen[a] + self.alen[a] + 1) // 32) + self.rng.randrange(3)) * 32
        fits = self.tight_fits.get(width)
        if fits is None:
            total = self.plen + self.alen
            fits = self.tight_fits[width] = ((total < width) & (total >= width - TIGHT_FILL)).nonzero().flatten() \
                .to(self.args.device)
        return self._rows(fits, width)  # never empty: the anchor itself fits

    def _rows(self, fits, width):
        bs = max(8, self.args.tokens_per_batch // width)
        idx = fits[torch.randint(0, len(fits), (bs,), generator=self.gen, device=self.args.device)]
        return make_batch(self.pool, idx, width, self.special.eos_id, self.special.mask_id, 32, self.gen)


def fill_share(batches: Batches, n: int = 200, model=None, shift: int = 0) -> dict[str, float]:
    """Where ``n`` batches' positions go: the share of all positions in the EOS fill, and of masked
    (trained) positions in answers and in the fill. With ``model`` (a checkpoint being continued),
    also its mean loss on each kind of masked position: what a step still has to learn there."""
    pos = fill = m_answer = m_fill = 0
    loss, counted = {"answer": 0.0, "fill": 0.0}, {"answer": 0, "fill": 0}
    for _ in range(n):
        x, target, masked, is_pad = batches.draw()
        pos += masked.numel()
        fill += int(is_pad.sum())
        m_answer += int((masked & ~is_pad).sum())
        m_fill += int((masked & is_pad).sum())
        if model is not None:
            with torch.no_grad():
                logits = model(x, torch.arange(x.shape[1], device=x.device)[None].expand_as(x))
            if shift:  # Dream: position i-1 predicts token i
                logits, target, masked, is_pad = logits[:, :-1], target[:, 1:], masked[:, 1:], is_pad[:, 1:]
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 reduction="none").view_as(target)
            for kind, where in (("answer", masked & ~is_pad), ("fill", masked & is_pad)):
                loss[kind] += float(ce[where].sum())
                counted[kind] += int(where.sum())
    out = {"fill": fill / pos, "masked_answer": m_answer / pos, "masked_fill": m_fill / pos}
    if model is not None:
        out.update({f"loss_{k}": v / max(1, counted[k]) for k, v in loss.items()})
    return out


class StepLoss:
    """Forward and backward of one batch, compiled on CUDA: torch.compile fuses the norms, RoPE and
    SwiGLU (the step is memory bound on them); shapes vary per batch, so they are dynamic. A compile
    failure falls back to eager, once, and says so."""

    def __init__(self, model, shift: int, args):
        self.model, self.shift, self.args = model, shift, args
        cuda = args.device.startswith("cuda")
        self.step_model = torch.compile(model, dynamic=True) if cuda and args.compile else model
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def _run(self, model, batch):
        with self.autocast:
            loss = loss_fn(model, self.shift, batch, self.args.pad_weight)
        loss.backward()
        return loss

    def __call__(self, batch, opt):
        opt.zero_grad(set_to_none=True)
        try:
            return self._run(self.step_model, batch)
        except Exception as e:  # noqa: BLE001 -- a compile failure: train eager instead
            if self.step_model is self.model:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {e}); training eager", file=sys.stderr)
            self.step_model, self.args.compile = self.model, False
            opt.zero_grad(set_to_none=True)
            return self._run(self.model, batch)


def _fit_steps(args, step: int, t0: float, since: tuple[float, int] | None) -> None:
    """Fit the run (and its LR schedule) into ``--max-minutes`` from the pace since the last fit
    point (the first steps compile; a run beside another shares the GPU, whose pace changes as the
    other compiles); the log records the steps, and ``--steps N`` replays the run."""
    if since is None:
        return
    per_step = (time.time() - since[0]) / (step - since[1])
    fit = int(step + (60 * args.max_minutes - (time.time() - t0)) / per_step * 0.97)
    print(f"{per_step * 1e3:.0f} ms/step: --steps {args.steps} -> {fit} to fit --max-minutes", file=sys.stderr)
    args.steps = fit


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        tasks = task_mix(args.task_weights)
        if not 0.0 <= args.tight_canvas <= 1.0:
            raise ValueError(f"--tight-canvas {args.tight_canvas}: give a share of batches, 0 to 1")
        ranks = Ranks()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.device = ranks.device(args.device)
    ranks.start(args.device)
    try:
        return _train(args, tasks, ranks)
    finally:
        ranks.stop()


# Data parallel: how often the ranks agree on whether the time limit has passed (each agreement is a
# host sync; a run of one process checks every step, for free).
STOP_CHECK_EVERY = 50


def _train(args, tasks, ranks: Ranks) -> int:
    torch.manual_seed(args.seed)
    if args.device.startswith("cuda"):
        # cuDNN attention builds a plan per shape; the flash / memory-efficient kernels do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = True
    tokenizer, config, spec, model = _new_model(args)
    ranks.sync_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    say = (lambda *a, **k: print(*a, **k, file=sys.stderr, flush=True)) if ranks.main else (lambda *a, **k: None)
    where = f"{args.device}" + (f", rank {ranks.rank} of {ranks.world} (data parallel)" if ranks.parallel else "")
    print(f"{args.format}: {n_params / 1e6:.2f}M parameters on {where}", file=sys.stderr)
    seed = ranks.rank_seed(args.seed)
    pool = tuple(t.to(args.device) for t in encode_pool(tokenizer, args.format, args.pool, seed + TRAIN_SEED_OFFSET,
                                                        tasks=tasks))
    batches = Batches(pool, args, special_tokens(spec, tokenizer), random.Random(seed), seed)
    if args.fill_share:
        if ranks.main:
            model.eval()  # with --init, the checkpoint's loss on each kind of position too
            got = fill_share(batches, args.fill_share, model if args.init else None, spec.logits_shift)
            print(json.dumps({"tight_canvas": args.tight_canvas, **{k: round(v, 4) for k, v in got.items()}}))
        return 0
    step_loss = StepLoss(model, spec.logits_shift, args)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=args.device.startswith("cuda"))
    warmup = min(300, args.steps // 10)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    t0 = last_save = time.time()
    log, loss_sum, stopped_early, since, step = [], None, False, None, 0

    def record():
        return {"parameters": n_params, "steps_done": step, "stopped_early": stopped_early,
                "seconds": round(time.time() - t0, 1), "world_size": ranks.world,
                "tokens_per_step": args.tokens_per_batch * ranks.world, "log": log}
    while step < args.steps:
        if step in FIT_AT and args.max_minutes is not None:
            if ranks.main:  # rank 0's fit binds every rank
                _fit_steps(args, step, t0, since)
            args.steps = int(ranks.agree(args.steps, args.device))
            since = (time.time(), step)
            if step >= args.steps:  # the fit ends the run here (steps_done is what --steps replays)
                break
        if args.max_minutes is not None and (not ranks.parallel or step % STOP_CHECK_EVERY == 0):
            if ranks.agree(time.time() - t0 > 60 * args.max_minutes, args.device):
                stopped_early = True
                say(f"safety stop after {step} steps ({args.max_minutes} min)")
                break
        batch = batches.draw()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = step_loss(batch, opt)
        ranks.average_grads(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if step % args.log_every == 0 or step == args.steps - 1:
            loss_sum = ranks.mean(loss_sum)  # the ranks' mean loss
            mean = loss_sum.item() / (step - log[-1]["step"] if log else 1)  # one host sync per log line
            loss_sum = None
            log.append({"step": step, "loss": round(mean, 4), "lr": lr_at(step), "s": round(time.time() - t0, 1)})
            say(json.dumps(log[-1]))
        step += 1
        if ranks.main and args.save_every and time.time() - last_save > 60 * args.save_every and step < args.steps:
            _save(model, tokenizer, config, args, {**record(), "partial": True})
            model.train()
            last_save = time.time()
    if ranks.main:  # saved first: a failed check below still leaves the run's weights
        _save(model, tokenizer, config, args, record())
    ranks.check_in_step(model, args.device)
    return 0


def _save(model, tokenizer, config: dict, args, record: dict) -> None:
    """The checkpoint, written beside ``args.out`` and then swapped in: whoever reads or packs
    ``args.out`` meanwhile (train_tiny.sh PHASE=collect) sees the previous save whole."""
    model.eval()
    out = args.out.rstrip("/")
    tmp, old = out + ".saving", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, config)
    write_generation_config(tmp, config)
    tokenizer.save_pretrained(tmp)
    _official_tokenizer_class(tmp)
    with open(os.path.join(tmp, "training_log.json"), "w") as f:
        json.dump({"args": {**vars(args), "suite": "worked"}, **record}, f, indent=1)
        f.write("\n")
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
