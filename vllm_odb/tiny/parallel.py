"""Data-parallel training of the tiny checkpoints over the processes ``torchrun`` starts.

A device session's minutes count the same whether its machine holds one GPU or eight, and the
tiny checkpoints need more training minutes than a session has (BENCHMARKS.md, the training runs
of #19). On a machine of several GPUs each format trains on its own share of them
(``scripts/train_tiny.sh`` splits them), one process a GPU:

    python3 -m torch.distributed.run --standalone --nproc-per-node 4 -m vllm_odb.tiny.train ...

Every rank holds the whole model (7-8M parameters) and draws its own batches from its own pool of
examples (``rank_seed``): the ranks see different problems, and a step's batch is the ranks'
batches together. After each backward the gradients are averaged over the ranks in one all-reduce
(``average_grads``), so every rank takes the same optimizer step and the weights stay equal; the run
checks that at the end (``check_in_step``). Decisions that end the loop (the step count fitted to
``--max-minutes``, the time limit's safety stop) are rank 0's, sent to every rank (``agree``), so no
rank waits in an all-reduce for one that stopped. Rank 0 alone logs and saves.

With one process (no ``WORLD_SIZE`` above 1) nothing here talks to anyone, and the seeds are the
single-process run's: a logged run replays as before.
"""

from __future__ import annotations

import os

import torch

# Ranks' pools and batch streams are this far apart in seed space: a run's --seed moves by 1 from
# one continuation to the next, and must not land on another rank's pool.
RANK_SEED_STRIDE = 10_007


class Ranks:
    """This process's place among the data-parallel ranks (``world`` 1: a run of its own)."""

    def __init__(self, env=None):
        env = os.environ if env is None else env
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local = int(env.get("LOCAL_RANK", "0"))
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"WORLD_SIZE={self.world}, RANK={self.rank}: not a rank of the run")
        self.group = None

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The rank that logs and saves."""
        return self.rank == 0

    def device(self, asked: str) -> str:
        """The device this rank trains on: its own GPU (``cuda:LOCAL_RANK``) when ``--device``
        names CUDA, else ``asked``."""
        if self.parallel and asked.startswith("cuda"):
            return f"cuda:{self.local}"
        return asked

    def start(self, device: str) -> None:
        """Join the ranks (NCCL on GPUs, gloo on the CPU); a run of one process joins nothing."""
        if not self.parallel:
            return
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        self.group = dist.group.WORLD

    def stop(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.group = None

    def rank_seed(self, seed: int) -> int:
        """Rank ``r``'s seed for its pool and batches: ``seed`` itself on rank 0 (and alone)."""
        return seed + RANK_SEED_STRIDE * self.rank

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter's gradient, averaged over the ranks in one all-reduce (a parameter
        without a gradient on a rank counts as zero there, the same on every rank)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(p).to(p.dtype)
            at += n

    def agree(self, value: float, device: str) -> float:
        """Rank 0's ``value`` on every rank (a loop bound or a stop flag)."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.broadcast(t, 0)
        return float(t.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (a logged loss)."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        value = value.detach().clone().to(torch.float64)
        dist.all_reduce(value)
        return value / self.world

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Rank 0's weights on every rank (one start for all, whatever each rank initialised)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        for p in model.parameters():
            dist.broadcast(p.data, 0)

    def check_in_step(self, model: torch.nn.Module, device: str) -> None:
        """Raise if the ranks' weights have drifted apart (the averaged gradients keep them equal
        to the bit; a rank that differs trained on something else), or hold NaN or inf. Rank 0
        has saved its weights by then."""
        if not self.parallel:
            return
        import torch.distributed as dist

        with torch.no_grad():
            sums = torch.stack([p.detach().double().abs().sum() + p.detach().double().sum() for p in model.parameters()])
        sums = sums.to(device)
        finite = torch.isfinite(sums)  # NaN never equals itself: found first, on every rank at once
        everywhere = finite.all().to(torch.float64).reshape(1)
        dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
        if not bool(everywhere.item()):
            names = [n for n, _ in model.named_parameters()]
            where = names[int((~finite).nonzero()[0, 0])] if not bool(finite.all()) else "a parameter of another rank"
            raise RuntimeError(f"training diverged: {where} holds NaN or inf (rank {self.rank} of {self.world})")
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            bad = int((low != high).nonzero()[0, 0])
            name = [n for n, _ in model.named_parameters()][bad]
            raise RuntimeError(f"data-parallel ranks disagree on {name} after training (rank {self.rank} "
                               f"of {self.world}): the run's weights are not one model")
