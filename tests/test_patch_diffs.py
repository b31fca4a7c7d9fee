"""The upstream-ready diffs in patches/ (CPU, no network): each applies cleanly to the installed
vLLM 0.26.0, and together they cover every runtime patch module in vllm_odb/patches.

The diffs are applied to copies of the files they touch in a temporary directory, never to the
installed vLLM. "Cleanly" means exactly: no fuzz and no offset (``patch --fuzz=0`` and no "Hunk"
line in its report), so a diff that only applies by luck fails here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vllm_odb.patches import SUPPORTED_VLLM

REPO = Path(__file__).resolve().parents[1]
DIFF_DIR = REPO / "patches"
NOTES = DIFF_DIR / "README.md"
RUNTIME_DIR = REPO / "vllm_odb" / "patches"
DIFFS = sorted([*DIFF_DIR.glob("*.diff"), *DIFF_DIR.glob("*.patch")])
HEADER = re.compile(r"^--- (\S+)[^\n]*\n\+\+\+ (\S+)", re.MULTILINE)  # a file's header pair


def _touched(diff: Path) -> list[str]:
    """Paths (relative to site-packages, i.e. after ``-p1``) that ``diff`` changes."""
    paths = []
    for old, new in HEADER.findall(diff.read_text()):
        assert old.startswith("a/vllm/") and new == "b/" + old[2:], (
            f"{diff.name}: header {old} -> {new} is not a/vllm/<file> -> b/vllm/<file>")
        paths.append(old[2:])
    assert paths, f"{diff.name}: no file headers"
    return sorted(set(paths))


@pytest.fixture(scope="module")
def vllm_root() -> Path:
    """The directory holding the installed ``vllm/`` package (site-packages)."""
    if shutil.which("patch") is None:
        pytest.skip("`patch` is not on PATH (install GNU patch to check patches/*.diff)")
    try:
        import vllm
    except ImportError:
        pytest.skip("vllm is not installed")
    if vllm.__version__ != SUPPORTED_VLLM:
        pytest.skip(f"patches/*.diff are written against vllm=={SUPPORTED_VLLM}; "
                    f"vllm=={vllm.__version__} is installed")
    return Path(vllm.__file__).resolve().parent.parent


def test_there_are_diffs():
    assert DIFFS, f"no *.diff or *.patch in {DIFF_DIR}"


@pytest.mark.parametrize("diff", DIFFS, ids=lambda p: p.name)
def test_diff_applies_cleanly_to_installed_vllm(diff, vllm_root, tmp_path):
    for rel in _touched(diff):
        src = vllm_root / rel
        assert src.is_file(), f"{diff.name} changes {rel}, which the installed vLLM does not have"
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    cmd = ["patch", "-p1", "--batch", "--fuzz=0", "-d", str(tmp_path), "-i", str(diff)]
    dry = subprocess.run([*cmd, "--dry-run"], check=False, capture_output=True, text=True)
    report = dry.stdout + dry.stderr
    assert dry.returncode == 0, f"{diff.name} does not apply to vllm=={SUPPORTED_VLLM}:\n{report}"
    assert "Hunk" not in report, f"{diff.name} applies only with an offset or fuzz:\n{report}"
    # Applied for real (to the copies): the changed files still compile.
    applied = subprocess.run(cmd, check=False, capture_output=True, text=True)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    for rel in _touched(diff):
        path = tmp_path / rel
        compile(path.read_text(), str(path), "exec")
        assert path.read_bytes() != (vllm_root / rel).read_bytes(), f"{diff.name} left {rel} unchanged"


# ---------------------------------------------------------------------------------------------
# patches/README.md: one section per diff, whose "Drops:" paragraph names the runtime patch
# modules that upstreaming it would let the plugin drop.
# ---------------------------------------------------------------------------------------------


def _sections() -> dict[str, str]:
    parts = re.split(r"^## +`?([\w.-]+\.(?:diff|patch))`? *$", NOTES.read_text(), flags=re.MULTILINE)
    return {name: body.split("\n## ", 1)[0] for name, body in zip(parts[1::2], parts[2::2])}


def _drops(body: str) -> set[str]:
    match = re.search(r"^Drops:(.*?)(?:\n\s*\n|\Z)", body, flags=re.MULTILINE | re.DOTALL)
    return set(re.findall(r"vllm_odb/patches/(\w+)\.py", match.group(1))) if match else set()


def test_every_diff_has_a_note_and_every_note_a_diff():
    sections = _sections()
    on_disk = {p.name for p in DIFFS}
    assert set(sections) == on_disk, (f"patches/README.md sections {sorted(sections)} "
                                      f"!= diffs on disk {sorted(on_disk)}")
    for name, body in sections.items():
        assert _drops(body), f"patches/README.md: {name} has no 'Drops:' line naming a vllm_odb/patches module"


def test_every_runtime_patch_module_is_covered_by_a_diff():
    modules = {p.stem for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py"}
    covered = set().union(*map(_drops, _sections().values()))
    assert modules - covered == set(), (
        f"runtime patch modules with no upstream diff in patches/: {sorted(modules - covered)} "
        "(write one, and name the module on its 'Drops:' line in patches/README.md)")
    assert covered - modules == set(), f"patches/README.md drops modules that do not exist: {sorted(covered - modules)}"


def test_the_applied_patch_list_matches_the_modules():
    """``apply_all`` applies exactly the modules in vllm_odb/patches (none forgotten there either)."""
    source = (RUNTIME_DIR / "__init__.py").read_text()
    names = re.findall(r"from vllm_odb\.patches import \(?([\w,\s]+?)\)?\n\s*\n", source)[0]
    applied = {n for n in re.split(r"[\s,]+", names) if n}
    assert applied == {p.stem for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py"}
