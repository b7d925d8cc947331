"""eptq-deploy: EPTQ post-training quantization for edge targets.

    import eptq_deploy
    qm = eptq_deploy.quantize(model, images, profile="int8-pot")
    bundle = eptq_deploy.export(qm, target="onnx-qdq", out="build/", data=held_out)
    y = eptq_deploy.load(bundle).run(x)
"""

__version__ = "0.1.0"

from .api import bench, check, export, load, quantize  # noqa: E402
from .errors import EptqError  # noqa: E402
from .quantized import QuantizedModel  # noqa: E402

__all__ = ["EptqError", "QuantizedModel", "__version__", "bench", "check", "export", "load", "quantize"]
