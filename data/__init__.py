"""The texts the project reads: WikiText-2 validation (calibration) and test (evaluation) splits.

The files ship inside the package (``rotkv_data``, this folder), so a clone and a non-editable install both
have them; provenance and licence (CC BY-SA 3.0) are in ``README.md`` beside this file.
``$ROTKV_DATA_DIR``, when set, is looked in instead (for other texts of the same names).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CALIB_TEXT", "EVAL_TEXT", "DATA_FILES", "data_dir", "data_path"]

CALIB_TEXT = "calib_wikitext2_valid.txt"  # calibrate on this
EVAL_TEXT = "wikitext2_test.txt"  # evaluate on this; never calibrate on it
DATA_FILES = (CALIB_TEXT, EVAL_TEXT)


def data_dir() -> Path:
    """``$ROTKV_DATA_DIR`` when set, else this package's folder."""
    env = os.environ.get("ROTKV_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """The path of one of :data:`DATA_FILES`.

    Raises:
        ValueError: ``name`` is not one of the project's texts.
        FileNotFoundError: the file is missing from :func:`data_dir` (names the folder and the override).
    """
    if name not in DATA_FILES:
        raise ValueError(f"name={name!r}: the project's texts are {DATA_FILES}")
    p = data_dir() / name
    if not p.is_file():
        where = "$ROTKV_DATA_DIR" if os.environ.get("ROTKV_DATA_DIR") else "the installed rotkv_data package"
        raise FileNotFoundError(f"{name} not found in {p.parent} ({where}); unset ROTKV_DATA_DIR or reinstall rotkv")
    return p
