"""The checkout carries what it reads: no file names a path of a particular machine or a folder beside the
checkout, and the texts the code reads by default are inside the repository (and its installed package)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Absolute paths of a machine (home folders, this workplace's folders, mounts) and any reach out of the
# checkout into a sibling ``shared`` folder, in any spelling a program or a docstring would use.
# The workplace's sibling folder and the machine roots of the fixture below are assembled from parts, so that
# this file, which must name them, does not itself read as a path out of the checkout.
SIBLING = "sha" + "red"
FORBIDDEN = [
    (re.compile(r"(?<![\w.~-])/(?:work|root|home|Users|opt|mnt|srv|scratch)/"), "absolute path of a machine"),
    (re.compile(r"\.\./" + SIBLING + r"\b"), "path into a sibling folder of the checkout"),
    (re.compile(r"""["']shared["']\s*/|/\s*["']shared["']"""), "path built from a 'shared' folder"),
    (re.compile(r"(?<![\w-])shared/data\b"), "the workplace's shared/data folder"),
    (re.compile(r"[A-Za-z]:\\\\Users\\\\"), "absolute Windows path"),
]
TEXT_SUFFIXES = {".py", ".sh", ".md", ".toml", ".cfg", ".txt", ".json", ".yaml", ".yml", ".ini", ""}
SKIP_SUFFIXES = {".safetensors", ".bin", ".png", ".jpg", ".gguf"}
DATA_TEXTS = {"data/calib_wikitext2_valid.txt", "data/wikitext2_test.txt"}  # the corpus itself is not code


def tracked_files() -> list[Path]:
    """Files git tracks (what a clone holds), else every file outside build/venv folders."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "__pycache__", "build", "dist"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and not skip & set(p.parts)]
    return [REPO / n for n in names if (REPO / n).is_file()]


def offending_lines(path: Path, root: Path = REPO) -> list[str]:
    """``file:line: why: text`` for every line that names a forbidden path."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    return [f"{path.relative_to(root)}:{no}: {what}: {line.strip()[:120]}"
            for no, line in enumerate(text.splitlines(), 1) for rx, what in FORBIDDEN if rx.search(line)]


def test_scanner_catches_machine_paths(tmp_path):
    bad = tmp_path / "x.py"
    sib, work, root, home = SIBLING, "/" + "work/", "/" + "root/", "/" + "home/"
    bad.write_text(f'A = "{work}{sib}/data/x.txt"\nB = Path(__file__).parents[2] / "{sib}" / "data"\n'
                   f'C = "../{sib}/data/y"\nD = "{root}.cache/x"\nE = "{home}me/x"\nok = "a/b/c" + "/tmp"\n')
    hit_lines = {int(h.split(":")[1]) for h in offending_lines(bad, tmp_path)}
    assert hit_lines == {1, 2, 3, 4, 5}
    good = tmp_path / "y.py"
    good.write_text('x = "data/wikitext2_test.txt"  # shared by all tests\ny = Path.home() / ".cache"\n')
    assert offending_lines(good, tmp_path) == []


def test_no_file_names_a_path_outside_the_checkout():
    files = [p for p in tracked_files()
             if p.suffix in TEXT_SUFFIXES and p.suffix not in SKIP_SUFFIXES
             and str(p.relative_to(REPO)) not in DATA_TEXTS and p != Path(__file__).resolve()]
    assert len(files) > 50, "the scan found almost no files: is this a checkout?"
    hits = [h for p in files for h in offending_lines(p)]
    assert not hits, "machine-specific or out-of-checkout paths:\n" + "\n".join(hits)


def test_texts_ship_in_the_repository_and_the_package():
    import rotkv_data

    for name in rotkv_data.DATA_FILES:
        p = rotkv_data.data_path(name)
        assert p.is_file() and p.stat().st_size > 1_000_000, p
        # the installed package resolves to this checkout's data/ (editable) or to site-packages (wheel),
        # never to a folder beside the checkout
        assert REPO.parent / "shared" not in p.parents
    assert (REPO / "data" / "README.md").read_text().count("CC BY-SA 3.0") >= 1
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'rotkv_data = "data"' in pyproject and 'rotkv_data = ["*.txt", "README.md"]' in pyproject


def test_data_path_refuses_unknown_names_and_names_the_override(tmp_path, monkeypatch):
    import rotkv_data

    with pytest.raises(ValueError, match="name='nope.txt'"):
        rotkv_data.data_path("nope.txt")
    monkeypatch.setenv("ROTKV_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ROTKV_DATA_DIR"):
        rotkv_data.data_path(rotkv_data.EVAL_TEXT)
    (tmp_path / rotkv_data.EVAL_TEXT).write_text("other text")
    assert rotkv_data.data_path(rotkv_data.EVAL_TEXT).read_text() == "other text"


@pytest.mark.slow
def test_a_non_editable_install_carries_the_texts(tmp_path):
    """Build the wheel, install it into a bare folder and read the default calibration text from there."""
    import os
    import sys

    import shutil

    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    had_build = (REPO / "build").exists()
    try:
        # ROTKV_BUILD_CPU_KERNELS=0: the texts are the point here, not the C++ kernels (setup.py would compile them)
        subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                       check=True, cwd=tmp_path, capture_output=True,
                       env=dict(os.environ, ROTKV_BUILD_CPU_KERNELS="0"))
    finally:  # setuptools builds in the checkout's build/: leave the checkout as it was
        if not had_build:
            shutil.rmtree(REPO / "build", ignore_errors=True)
    (wheel,) = wheels.glob("rotkv-*.whl")
    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "ROTKV_DATA_DIR"} | {"PYTHONPATH": str(site)}
    code = "import rotkv_data as d; print(d.data_path(d.CALIB_TEXT)); print(d.data_path(d.EVAL_TEXT).stat().st_size)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=tmp_path).stdout.split()
    assert Path(out[0]).parent == site / "rotkv_data"
    assert int(out[1]) == (REPO / "data" / "wikitext2_test.txt").stat().st_size
