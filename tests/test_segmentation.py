"""Segmentation masks and mIoU on tiny hand-made masks with hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eptq_deploy.errors import DataError
from eptq_deploy.segmentation import (
    VOC_PALETTE,
    confusion,
    miou,
    miou_vs_reference,
    predict_mask,
    read_mask,
    read_masks,
)

IDS = np.array([[0, 1, 15], [255, 20, 0]], np.uint8)  # background, aeroplane, person / void, tv, background


def test_voc_palette_known_colours() -> None:
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[20].tolist() == [0, 64, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in VOC_PALETTE.tolist()}) == 256  # colours map back uniquely


def test_rgb_palette_round_trip(tmp_path) -> None:
    path = tmp_path / "0_target.png"
    Image.fromarray(VOC_PALETTE[IDS], "RGB").save(path)
    mask = read_mask(path)
    assert mask.dtype == np.int64
    np.testing.assert_array_equal(mask, IDS)


def test_palette_mode_and_grey_masks(tmp_path) -> None:
    p = Image.fromarray(IDS, "P")
    p.putpalette(VOC_PALETTE.ravel().tolist())
    p.save(tmp_path / "p.png")
    Image.fromarray(IDS, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), IDS)
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), IDS)


def test_unknown_colour_is_named(tmp_path) -> None:
    rgb = VOC_PALETTE[IDS].copy()
    rgb[1, 1] = [1, 2, 3]
    Image.fromarray(rgb, "RGB").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png has colour \(1, 2, 3\)"):
        read_mask(tmp_path / "bad.png")


def test_read_masks_both_naming_rules(tmp_path) -> None:
    Image.fromarray(IDS, "L").save(tmp_path / "7_target.png")
    Image.fromarray(IDS + 1, "L").save(tmp_path / "cat.png")
    masks = read_masks(tmp_path, ["7_image.png", "images/cat.jpg"])
    np.testing.assert_array_equal(masks[0], IDS)
    np.testing.assert_array_equal(masks[1], IDS + 1)
    with pytest.raises(DataError, match=r"9_target\.png not found \(\+1 more\)"):
        read_masks(tmp_path, ["7_image.png", "9_image.png", "dog.jpg"])


def test_predict_mask_argmax_then_nearest() -> None:
    # 3x3 argmax map [[0,1,2],[3,0,1],[2,3,0]] as one-hot logits
    classes = np.array([[0, 1, 2], [3, 0, 1], [2, 3, 0]])
    logits = np.eye(4, dtype=np.float32)[classes].transpose(2, 0, 1)[None]  # [1, 4, 3, 3]
    np.testing.assert_array_equal(predict_mask(logits)[0], classes)
    # 3 -> 5: source floor((y + 0.5) * 3 / 5) = 0, 0, 1, 2, 2
    up = predict_mask(logits, (5, 5))[0]
    rows = np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(up, classes[rows[:, None], rows[None, :]])
    # 3 -> 6 is exact pixel doubling
    np.testing.assert_array_equal(predict_mask(logits, (6, 6))[0], classes.repeat(2, 0).repeat(2, 1))
    nhwc = predict_mask(logits.transpose(0, 2, 3, 1), (5, 5), layout="NHWC")
    np.testing.assert_array_equal(nhwc[0], up)
    assert up.dtype == np.int64


TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 2]])
PRED = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 1], [2, 2, 2, 0]])


def test_confusion_and_miou_hand_computed() -> None:
    conf = confusion(PRED, TARGET, 4)
    # rows target, columns prediction; the two void pixels are skipped
    np.testing.assert_array_equal(conf, [[3, 1, 0, 0], [0, 4, 0, 0], [1, 0, 5, 0], [0, 0, 0, 0]])
    res = miou(conf)
    # IoU0 = 3/(3+1+1), IoU1 = 4/(4+1), IoU2 = 5/(5+1); class 3 never occurs
    expected = [60.0, 80.0, 500 / 6]
    assert res["iou"][:3] == pytest.approx(expected) and res["iou"][3] is None
    assert res["classes"] == 3
    assert res["miou"] == pytest.approx(sum(expected) / 3)
    assert miou(conf, present_only=False)["miou"] == pytest.approx(sum(expected) / 4)
    # lists of masks of different sizes add up
    twice = confusion([PRED, PRED[:2, :2]], [TARGET, TARGET[:2, :2]], 4)
    np.testing.assert_array_equal(twice - conf, confusion(PRED[:2, :2], TARGET[:2, :2], 4))


def test_miou_vs_reference_identical_is_100() -> None:
    assert miou_vs_reference(PRED, PRED, 4)["miou"] == pytest.approx(100.0)
    assert miou_vs_reference([PRED], [TARGET.clip(0, 3)], 4)["miou"] < 100.0


def test_confusion_bad_inputs() -> None:
    with pytest.raises(DataError, match="differ in shape"):
        confusion(PRED, TARGET[:3], 4)
    with pytest.raises(DataError, match="class id 5"):
        confusion(PRED, np.where(TARGET == 2, 5, TARGET), 4)
