"""Registers rotkv's ``optimum-cli rotkv ...`` commands (optimum 2.x discovers ``REGISTER_COMMANDS`` here).

This file lives in the ``optimum.commands.register`` namespace (PEP 420: no ``__init__.py``). optimum imports
every module of that namespace when ``optimum-cli`` starts, so it only imports the command classes, which
import torch, transformers, diffusers or vLLM inside ``run()``. optimum does not guard these imports: a broken
rotkv install must not take the other ``optimum-cli`` commands down with it, so an import error is logged and
no command is registered.
"""

import logging

try:
    from optimum_plugin.commands import RotKVCommand
except ImportError as e:  # e.g. a partial install; the message says what is missing
    logging.getLogger("optimum_plugin").warning("optimum-cli rotkv is unavailable: %s", e)
    REGISTER_COMMANDS = []
else:
    REGISTER_COMMANDS = [RotKVCommand]
