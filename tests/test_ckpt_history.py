"""scripts/ckpt_history.sh: a checkpoint saved into git history leaves the tree as it was and comes
back byte for byte, in the tar layout train_tiny.sh's INIT_TARS reads."""

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ckpt_history.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/ckpt_history.sh", *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path):
    r = tmp_path / "repo"
    (r / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, r / "scripts" / "ckpt_history.sh")
    (r / "benchmarks" / "results" / "dynamics").mkdir(parents=True)
    (r / "README.md").write_text("x\n")
    _git(r, "init", "-q")
    _git(r, "add", ".")
    _git(r, "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-q", "-m", "init")
    return r


def _checkpoint(d: Path, fmt: str, payload: bytes) -> Path:
    c = d / f"tiny-{fmt}"
    c.mkdir(parents=True)
    (c / "config.json").write_text('{"model_type": "%s"}' % fmt)
    (c / "model.safetensors").write_bytes(payload)
    return c


def test_save_keeps_the_checkpoint_in_history_only_and_restore_brings_it_back(repo, tmp_path):
    src = tmp_path / "trained"
    _checkpoint(src, "llada", b"\x01" * 1000)
    # the other format as a tar, as train_tiny.sh's collect packs it
    _checkpoint(tmp_path / "packed", "dream", b"\x02" * 500)
    with tarfile.open(src / "tiny-dream.tar", "w") as t:
        t.add(tmp_path / "packed" / "tiny-dream", arcname="tiny-dream")
    before = set(_git(repo, "ls-files").split())
    res = _run(repo, "save", "v1", str(src))
    assert res.returncode == 0, res.stderr
    assert _git(repo, "status", "--porcelain") == ""
    after = set(_git(repo, "ls-files").split())
    assert after - before == {"benchmarks/results/dynamics/checkpoint-history.txt"}
    assert not (repo / "checkpoints").exists()
    version, sha, path, *fmts = (repo / "benchmarks/results/dynamics/checkpoint-history.txt").read_text().split()
    assert (version, path, fmts) == ("v1", "checkpoints/in-training/v1", ["llada", "dream"])
    assert "model.safetensors" in _git(repo, "ls-tree", "-r", "--name-only", sha)

    out = tmp_path / "restored"
    res = _run(repo, "restore", "v1", str(out))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tiny-dream.tar", "tiny-llada.tar"]
    with tarfile.open(out / "tiny-llada.tar") as t:
        assert t.extractfile("tiny-llada/model.safetensors").read() == b"\x01" * 1000
    with tarfile.open(out / "tiny-dream.tar") as t:
        assert t.extractfile("tiny-dream/model.safetensors").read() == b"\x02" * 500


def test_refusals_name_what_is_wrong(repo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _run(repo, "save", "v1", str(empty))
    assert res.returncode == 2 and "holds no tiny-llada or tiny-dream" in res.stderr
    res = _run(repo, "save", "v 1", str(empty))
    assert res.returncode == 2 and "VERSION" in res.stderr
    res = _run(repo, "restore", "v9", str(tmp_path / "o"))
    assert res.returncode == 2 and "not in" in res.stderr
    (repo / "dirty.txt").write_text("x")
    _checkpoint(tmp_path / "c", "llada", b"\x03")
    res = _run(repo, "save", "v2", str(tmp_path / "c"))
    assert res.returncode == 2 and "working tree has changes" in res.stderr


def test_paths_are_taken_from_where_it_runs_and_versions_match_exactly(repo, tmp_path):
    """DIR and OUT relative to the caller's folder (not the repository's top); a version with a dot
    matches itself only; a restore into a folder that holds tars already is refused."""
    sub = repo / "sub"  # (an empty folder: git does not see it)
    sub.mkdir()
    _checkpoint(tmp_path / "ck", "llada", b"\x05" * 10)

    def run(*args):
        return subprocess.run(["bash", "../scripts/ckpt_history.sh", *args], cwd=sub, capture_output=True, text=True)

    for version, payload in (("v1.0", b"\x05"), ("v1x0", b"\x06")):
        (tmp_path / "ck" / "tiny-llada" / "model.safetensors").write_bytes(payload * 10)
        res = run("save", version, "../../ck")
        assert res.returncode == 0, res.stderr
    res = run("restore", "v1.0", "../../out")
    assert res.returncode == 0, res.stderr
    assert "one format only" in res.stderr
    with tarfile.open(tmp_path / "out" / "tiny-llada.tar") as t:
        assert t.extractfile("tiny-llada/model.safetensors").read() == b"\x05" * 10  # v1.0's, not v1x0's
    res = run("save", "v1.0", "../../ck")
    assert res.returncode == 2 and "already in" in res.stderr
    res = run("restore", "v1x0", "../../out")
    assert res.returncode == 2 and "already holds checkpoint tars" in res.stderr
