"""Registers rotkv's ``optimum-cli rotkv ...`` commands (optimum 2.x discovers ``REGISTER_COMMANDS`` here).

This file lives in the ``optimum.commands.register`` namespace (PEP 420: no ``__init__.py``). optimum imports
every module of that namespace when ``optimum-cli`` starts, so it only imports the command classes, which
import torch, transformers, diffusers or vLLM inside ``run()``.
"""

from optimum_plugin.commands import RotKVCommand

REGISTER_COMMANDS = [RotKVCommand]
