"""eptq-deploy: EPTQ post-training quantization for edge targets."""

__version__ = "0.1.0"
