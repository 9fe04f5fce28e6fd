"""The Python face of the ``optimum-cli rotkv`` commands: one ``optimum`` ``OptimumQuantizer`` per method, each
beside its method (RotateKV: ``optimum_plugin.rotatekv``, LRQ-DiT: ``optimum_plugin.lrq_dit.optimum_quantizer``,
HALO: ``optimum_plugin.halo.optimum_quantizer``; shared parts: ``optimum_plugin.quantizer_base``).

    q = RotateKVQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")       # or a local folder
    q.quantize("out/", calib_file="calib.txt")          # model files + rotkv_config.json/.safetensors + README.md
    q.push_to_hub("alice/smollm2-rotkv2", private=True)  # one atomic commit; the card names the repo id

Loading what was pushed, by repo id or folder: :func:`load_rotkv`, :func:`load_lrq_dit`, :func:`load_halo`.
"""

from optimum_plugin.halo.optimum_quantizer import HALOQuantizer, load_halo
from optimum_plugin.lrq_dit.optimum_quantizer import LRQDiTQuantizer, load_lrq_dit
from optimum_plugin.rotatekv.optimum_quantizer import RotateKVQuantizer, load_rotkv

__all__ = ["HALOQuantizer", "LRQDiTQuantizer", "RotateKVQuantizer", "load_halo", "load_lrq_dit", "load_rotkv"]
