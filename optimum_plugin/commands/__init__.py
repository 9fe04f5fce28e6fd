"""``optimum-cli rotkv ...``: calibrate / quantize / export, write a model card, optionally push to the Hub.

    optimum-cli rotkv rotatekv  -m MODEL OUTPUT --calib-file calib.txt [--bits 2] [--push-to-hub REPO_ID]
    optimum-cli rotkv lrq-dit   -m PIPELINE OUTPUT --prompts 0,1,2,3 [--weight-bits 4 --act-bits 8] [--push-to-hub ...]
    optimum-cli rotkv halo-export -m CHECKPOINT OUTPUT [--format w8a8|bf16] [--push-to-hub ...]
    optimum-cli rotkv push OUTPUT REPO_ID            # (re)push a finished output folder, e.g. after a failed upload

Hub options (all three): ``--push-to-hub REPO_ID``, ``--private``, ``--token`` (else ``HF_TOKEN`` / the saved
login), ``--revision`` (the branch pushed to), ``--commit-message``, ``--retries``. optimum discovers the commands
through ``optimum/commands/register/rotkv.py``; this package imports only argparse-level code, the work happens in
``run()``.
"""

from optimum_plugin.commands.rotkv import (
    HALOExportCommand,
    LRQDiTCommand,
    PushCommand,
    RotateKVCommand,
    RotKVCommand,
)

__all__ = ["RotKVCommand", "RotateKVCommand", "LRQDiTCommand", "HALOExportCommand", "PushCommand"]
