"""The named preprocessing presets, apart from the data loaders so the CLI's help can list
them without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """``(x * scale - mean) / std`` on 0..255 RGB, after resize + centre crop.

    ``resize`` is the shorter side before the ``crop`` x ``crop`` centre crop.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float


PRESETS: dict[str, Preset] = {
    "imagenet": Preset(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "cifar": Preset(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255),
    "lite": Preset(256, 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), 1.0),
}

#: the preset of models that do not name one (built-in models name their own)
DEFAULT_PRESET = "imagenet"


def describe_presets() -> str:
    """One phrase per preset, for help texts."""

    def one(name: str, p: Preset) -> str:
        unit = "" if p.scale == 1 else " on 0..1"
        mean = ",".join(f"{v:g}" for v in p.mean)
        std = ",".join(f"{v:g}" for v in p.std)
        return f"{name} (shorter side {p.resize}, centre crop {p.crop}, mean {mean}, std {std}{unit})"

    return "; ".join(one(n, p) for n, p in PRESETS.items())
