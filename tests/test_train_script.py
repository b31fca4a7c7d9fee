"""scripts/train_tiny.sh on the CPU, with a few training steps: the background run across device
calls (BACKGROUND=1, then PHASE=collect) continuing carried checkpoint tars (INIT_TARS, a relative
path, as a device call carries them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--tokens-per-batch 1024 --pool 64 --device cpu"


def _script(env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # python3 with torch
    return subprocess.run(["bash", "scripts/train_tiny.sh"], cwd=REPO, env={**os.environ, "PATH": path, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_background_training_continues_carried_tars_and_is_collected(tmp_path):
    first = _script({"PHASE": "train", "WORK": str(tmp_path / "w1"), "OUT": str(tmp_path / "tars"),
                     "MAXMIN": "0.2", "TRAIN_ARGS": TINY})
    assert first.returncode == 0, first.stderr[-2000:]
    work, init = tmp_path / "w2", tmp_path / "init"
    env = {"PHASE": "train", "WORK": str(work), "INIT_DIR": str(init), "MAXMIN": "0.2", "TRAIN_ARGS": TINY,
           "INIT_TARS": os.path.relpath(tmp_path / "tars", REPO), "BACKGROUND": "1"}
    started = _script(env, timeout=120)
    assert started.returncode == 0 and "background" in started.stdout, started.stderr
    again = _script(env, timeout=120)  # a second run in the same WORK while the first goes on
    assert again.returncode == 2 and "still going" in again.stderr
    got = _script({"PHASE": "collect", "WORK": str(work), "WAIT": "500", "OUT": str(tmp_path / "out")})
    assert "background run ended, rc 0" in got.stdout, got.stdout[-2000:]
    for fmt in ("llada", "dream"):
        with tarfile.open(tmp_path / "out" / f"tiny-{fmt}.tar") as t:
            log = json.load(t.extractfile(f"tiny-{fmt}/training_log.json"))
        assert log["args"]["init"] == str(init / f"tiny-{fmt}")  # continued the carried checkpoint


@pytest.mark.slow
def test_collect_stops_a_run_and_timed_work_waits_for_a_quiet_gpu(tmp_path):
    """PHASE=collect STOP=1 packs a run's partial checkpoints and ends it; before that, the timed GPU
    scripts refuse to start beside it (session 11 lost its speed calls to engines that could not
    start beside a training run)."""
    work = tmp_path / "w"
    env = {"PHASE": "train", "WORK": str(work), "MAXMIN": "5", "TRAIN_ARGS": TINY + " --save-every 0.02",
           "BACKGROUND": "1"}
    assert _script(env, timeout=120).returncode == 0
    pid = int((work / "pid").read_text())
    try:
        timed = subprocess.run(["bash", "scripts/gpu_overlap_speed.sh"], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PART": "speed", "TRAIN_WORK": str(work)}, timeout=60)
        assert timed.returncode == 3 and "quiet GPU" in timed.stdout
        got = _script({"PHASE": "collect", "WORK": str(work), "WAIT": "20", "STOP": "1",
                       "OUT": str(tmp_path / "out")})
        assert "stopped the run" in got.stdout, got.stdout[-2000:] + got.stderr[-2000:]
        assert (work / "done").read_text().strip() == "stopped"
    finally:
        try:  # never leave a training run behind a failed assertion
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_several_gpus_are_split_between_the_formats():
    """Each format trains on its own half of TRAIN_GPUS (an odd one out stays idle); one GPU is
    shared; 'none' is the CPU."""
    for gpus, want in (("0,1,2,3,4,5,6,7", ("0,1,2,3", "4,5,6,7")), ("1,2,3,4,5,6,7", ("1,2,3", "4,5,6")),
                       ("0,1,2", ("0", "1")), ("3", ("3", "3")), ("none", ("none", "none"))):
        got = _script({"PHASE": "gpus", "TRAIN_GPUS": gpus}, timeout=60)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split("\n")[:2] == [f"llada: GPUs {want[0]}", f"dream: GPUs {want[1]}"]
    masked = _script({"PHASE": "gpus", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, timeout=60)  # the caller's GPUs, by id
    assert masked.stdout.split("\n")[:2] == ["llada: GPUs 4,5", "dream: GPUs 6,7"], masked.stderr


@pytest.mark.slow
def test_a_format_with_several_gpus_trains_data_parallel(tmp_path):
    """TRAIN_GPUS of four: each format runs torchrun over two ranks (here on the CPU: the GPU ids
    only pick devices), and its checkpoint's log says so."""
    got = _script({"PHASE": "train", "WORK": str(tmp_path / "w"), "OUT": str(tmp_path / "tars"), "MAXMIN": "0.3",
                   "TRAIN_GPUS": "0,1,2,3", "TRAIN_ARGS": TINY + " --steps 2"})
    assert got.returncode == 0, got.stderr[-2000:] + got.stdout[-2000:]
    for fmt in ("llada", "dream"):
        log = json.loads((tmp_path / "w" / f"tiny-{fmt}" / "training_log.json").read_text())
        assert log["world_size"] == 2 and log["steps_done"] == 2, log
        assert "data parallel" in (tmp_path / "w" / f"train-{fmt}.log").read_text()


def _fanout(jobs: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_fanout.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JOBS": jobs, "DRY": "1", **env})


def test_fanout_runs_one_timed_part_a_gpu_and_refuses_shared_ones():
    """scripts/gpu_fanout.sh (dry): each job on its own GPU with its own caches and tag, newlines
    allowed between jobs; two jobs on one GPU, a job on a training GPU, a job without a PART or a
    GPU number, and more jobs than a call brings files back are refused by name."""
    got = _fanout("0:PART=speed METHODS=fast-dllm,odb-alp BATCHES=1,8;\n 1:PART=speed MODEL=dream-7b TAG=dream;2:PART=kernel")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.strip().split("\n")
    assert len(lines) == 3
    assert "CUDA_VISIBLE_DEVICES=0 " in lines[0] and "TAG=gpu0" in lines[0] and "BATCHES=1,8" in lines[0]
    assert "TRITON_CACHE_DIR=/tmp/fanout-gpu1/triton" in lines[1] and "TAG=dream" in lines[1] \
        and "TAG=gpu1" not in lines[1]
    assert "PART=kernel" in lines[2] and "TRAIN_WORK" not in lines[2]
    beside = _fanout("3:PART=speed", TRAIN_GPUS="1,2")
    assert beside.returncode == 0 and "TRAIN_WORK=/nonexistent" in beside.stdout  # skips the quiet-GPU wait
    for jobs, train, msg in (("0:PART=speed;0:PART=kernel", "", "two jobs on GPU 0"),
                             ("0:PART=speed;00:PART=kernel", "", "two jobs on GPU 0"),
                             ("1:PART=speed", "1,2", "GPU 1 is training"),
                             ("x:PART=speed", "", "does not start with a GPU number"),
                             ("2:TAG=a", "", "names no PART"),
                             ("1:PART=speed;2:PART=speed TAG=gpu1", "", "two jobs write overlap-speed-gpu1"),
                             (";".join(f"{g}:PART=speed" for g in range(9)), "", "9 jobs")):
        bad = _fanout(jobs, TRAIN_GPUS=train)
        assert bad.returncode == 2 and msg in bad.stderr, (jobs, bad.stderr)


def test_fanout_reads_the_gpus_a_background_training_run_holds(tmp_path):
    """A training run going in TRAIN_WORK (train_tiny.sh BACKGROUND=1) wrote the GPUs it trains on:
    the fan-out refuses a job on one of them without being told, and refuses to guess when the run
    names none; a run that has ended holds nothing."""
    work = tmp_path / "train"
    (work / "code").mkdir(parents=True)
    (work / "gpus").write_text("2,3\n")
    bad = _fanout("2:PART=speed", TRAIN_WORK=str(work))
    assert bad.returncode == 2 and "GPU 2 is training" in bad.stderr
    ok = _fanout("0:PART=speed", TRAIN_WORK=str(work))
    assert ok.returncode == 0 and "TRAIN_WORK=/nonexistent" in ok.stdout
    (work / "gpus").unlink()
    unnamed = _fanout("0:PART=speed", TRAIN_WORK=str(work))
    assert unnamed.returncode == 2 and "give TRAIN_GPUS" in unnamed.stderr
    (work / "done").write_text("0\n")
    ended = _fanout("2:PART=speed", TRAIN_WORK=str(work))
    assert ended.returncode == 0 and "TRAIN_WORK=" not in ended.stdout
