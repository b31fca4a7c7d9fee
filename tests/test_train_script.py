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
