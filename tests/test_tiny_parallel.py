"""Data-parallel training of the tiny checkpoints (tiny/parallel.py), on the CPU with gloo: the
gradients are averaged over the ranks, the ranks' stop decisions are rank 0's, drifted weights are
caught, and a torchrun run of two ranks trains and saves one checkpoint. (The processes talk over
the loopback interface only.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_odb.tiny.parallel import RANK_SEED_STRIDE, Ranks

REPO = Path(__file__).resolve().parents[1]


def test_a_run_of_one_process_is_left_as_it_was():
    """No WORLD_SIZE: no process group, rank 0's seeds (a logged run replays), nothing averaged."""
    r = Ranks({})
    assert (r.world, r.rank, r.parallel, r.main) == (1, 0, False, True)
    assert r.rank_seed(7) == 7 and r.device("cuda") == "cuda" and r.device("cpu") == "cpu"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    r.average_grads([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert r.agree(5, "cpu") == 5
    r3 = Ranks({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert r3.rank_seed(7) == 7 + 3 * RANK_SEED_STRIDE and r3.device("cuda") == "cuda:1" and not r3.main
    with pytest.raises(ValueError, match="RANK=4"):
        Ranks({"WORLD_SIZE": "4", "RANK": "4"})


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=world, rank=rank)
    r = Ranks()
    r.group = dist.group.WORLD
    torch.manual_seed(rank)  # different weights on each rank until rank 0's are sent
    model = torch.nn.Linear(3, 2)
    r.sync_weights(model)
    w = model.weight, model.bias
    w[0].grad = torch.full_like(w[0], float(rank + 1))  # rank r's gradient: r + 1
    w[1].grad = None  # no gradient on any rank: zero
    r.average_grads(list(model.parameters()))
    got = {"weight_grad": w[0].grad.tolist(), "bias_grad": w[1].grad.tolist(),
           "agree": r.agree(10.0 + rank, "cpu"), "mean": float(r.mean(torch.tensor(float(rank)))),
           "weights": w[0].detach().tolist()}
    r.check_in_step(model, "cpu")
    with torch.no_grad():
        if rank == 1:
            model.bias.add_(1e-6)  # one rank drifts
    try:
        r.check_in_step(model, "cpu")
        got["drift"] = None
    except RuntimeError as e:
        got["drift"] = str(e)
    with torch.no_grad():
        if rank == 0:
            model.weight[0, 0] = float("nan")  # one rank diverges: both ranks say so, neither waits
    try:
        r.check_in_step(model, "cpu")
        got["nan"] = None
    except RuntimeError as e:
        got["nan"] = str(e)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    r.stop()


def test_ranks_average_gradients_agree_on_rank_0_and_catch_drift(tmp_path):
    world = 2
    out = str(tmp_path / "got")
    torch.multiprocessing.spawn(_worker, args=(world, str(tmp_path / "store"), out), nprocs=world, join=True)
    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    for g in got:
        assert g["weight_grad"] == [[1.5] * 3] * 2  # (1 + 2) / 2
        assert g["bias_grad"] == [0.0, 0.0]
        assert g["agree"] == 10.0  # rank 0's value
        assert g["mean"] == 0.5
        assert "disagree on bias" in g["drift"]
        assert "diverged" in g["nan"]
    assert "weight holds NaN" in got[0]["nan"] and "another rank" in got[1]["nan"]
    assert got[0]["weights"] == got[1]["weights"]  # rank 0's start on both


def _torchrun(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vllm_odb.tiny.train", "--format", "llada", "--out", str(out), "--pool", "64",
           "--tokens-per-batch", "1024", "--device", "cpu", "--log-every", "1", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_torchrun_trains_one_checkpoint_over_two_ranks_and_stops_them_together(tmp_path):
    """Two ranks, three steps: rank 0 saves a loadable checkpoint whose log names the ranks and
    the ranks' step; then a time limit already passed stops both ranks at once (no rank is left
    waiting in an all-reduce: the call returns)."""
    from vllm_odb.reference.model import load_model

    run = _torchrun(tmp_path, "--steps", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1 of 2 (data parallel)" in run.stderr
    log = json.loads((tmp_path / "ckpt" / "training_log.json").read_text())
    assert (log["world_size"], log["steps_done"], log["tokens_per_step"]) == (2, 3, 2048)
    assert [e["step"] for e in log["log"]] == [0, 1, 2]
    load_model(str(tmp_path / "ckpt"))
    stopped = _torchrun(tmp_path, "--steps", "1000", "--max-minutes", "1e-9")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    log = json.loads((tmp_path / "ckpt" / "training_log.json").read_text())
    assert log["stopped_early"] and log["steps_done"] == 0
