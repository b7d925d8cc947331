"""Detection decode, NMS and COCO scoring on tiny hand-built outputs with hand-computed answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from eptq_deploy.detection import (
    COCO80_IDS,
    Detections,
    coco_image_ids,
    coco_map,
    decode_ssd,
    decode_yolox,
    map_vs_reference,
    postprocess_decoded,
    ssd_anchors,
    to_original,
)
from eptq_deploy.errors import DataError

# --------------------------------------------------------------------------- helpers


def decoded(rows: list[tuple[float, ...]], num_classes: int = 2) -> np.ndarray:
    """A decoded [1, A, 5+C] output from (cx, cy, w, h, obj, *class scores) rows."""
    out = np.zeros((1, len(rows), 5 + num_classes), np.float32)
    for i, r in enumerate(rows):
        out[0, i, : len(r)] = r
    return out


def dets(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(np.array(boxes, np.float32), np.array(scores, np.float32), np.array(classes))


# --------------------------------------------------------------------------- YOLOX decode


def toy_yolox() -> np.ndarray:
    """32x32 input, strides 8 and 16: 4x4 + 2x2 = 20 anchors, two of them live."""
    out = np.zeros((1, 20, 5 + 3), np.float32)
    # stride 8, cell (gx=2, gy=1) -> anchor 1 * 4 + 2 = 6
    out[0, 6, :4] = [0.5, 0.25, math.log(2.0), 0.0]
    out[0, 6, 4] = 0.9
    out[0, 6, 5:] = [0.1, 0.8, 0.2]
    # stride 16, cell (gx=1, gy=0) -> anchor 16 + 0 * 2 + 1 = 17
    out[0, 17, :4] = [0.0, 0.5, 0.0, math.log(3.0)]
    out[0, 17, 4] = 0.5
    out[0, 17, 5:] = [0.6, 0.0, 0.0]
    return out


def test_decode_yolox_grid_and_stride() -> None:
    dec = decode_yolox(toy_yolox(), (32, 32), strides=(8, 16))
    assert dec.shape == (1, 20, 8)
    np.testing.assert_allclose(dec[0, 6, :4], [20.0, 10.0, 16.0, 8.0], rtol=1e-6)
    np.testing.assert_allclose(dec[0, 17, :4], [16.0, 8.0, 16.0, 48.0], rtol=1e-6)
    # an all-zero anchor decodes to its cell corner with a one-stride box: stride 8, (gx=3, gy=2) -> 11
    np.testing.assert_allclose(dec[0, 11, :4], [24.0, 16.0, 8.0, 8.0])
    np.testing.assert_array_equal(dec[..., 4:], toy_yolox()[..., 4:])  # scores untouched


def test_decode_yolox_then_postprocess_gives_xyxy_in_pixels() -> None:
    (d,) = postprocess_decoded(decode_yolox(toy_yolox(), (32, 32), strides=(8, 16)), (32, 32))
    np.testing.assert_allclose(d.boxes, [[12, 6, 28, 14], [8, -16, 24, 32]], atol=1e-5)
    np.testing.assert_allclose(d.scores, [0.9 * 0.8, 0.5 * 0.6], rtol=1e-6)
    np.testing.assert_array_equal(d.classes, [1, 0])
    assert d.boxes.dtype == np.float32 and d.classes.dtype == np.int64


def test_decode_yolox_refuses_wrong_anchor_count() -> None:
    with pytest.raises(DataError, match="20 anchors"):
        decode_yolox(toy_yolox(), (64, 64), strides=(8, 16))


# --------------------------------------------------------------------------- postprocess


def test_nms_is_class_wise() -> None:
    a = (50, 50, 20, 20, 1.0, 0.9, 0.0)
    b = (52, 50, 20, 20, 1.0, 0.8, 0.0)  # IoU with a = 18/22 > 0.65
    same = postprocess_decoded(decoded([a, b]), (100, 100))[0]
    assert len(same) == 1 and same.scores[0] == pytest.approx(0.9)

    b_other = (52, 50, 20, 20, 1.0, 0.0, 0.8)
    both = postprocess_decoded(decoded([a, b_other]), (100, 100))[0]
    np.testing.assert_array_equal(both.classes, [0, 1])
    agnostic = postprocess_decoded(decoded([a, b_other]), (100, 100), class_agnostic=True)[0]
    assert len(agnostic) == 1

    far = (80, 50, 20, 20, 1.0, 0.8, 0.0)  # no overlap with a: kept
    assert len(postprocess_decoded(decoded([a, far]), (100, 100))[0]) == 2


def test_score_threshold_and_best_class_vs_multi_label() -> None:
    rows = [
        (20, 20, 10, 10, 0.5, 0.3, 0.2),  # best class 0: 0.15; class 1: 0.10
        (60, 60, 10, 10, 0.1, 0.5, 0.0),  # 0.05: below 0.1
    ]
    best = postprocess_decoded(decoded(rows), (100, 100), score_threshold=0.1)[0]
    np.testing.assert_allclose(best.scores, [0.15], rtol=1e-6)
    np.testing.assert_array_equal(best.classes, [0])
    multi = postprocess_decoded(decoded(rows), (100, 100), score_threshold=0.1, multi_label=True)[0]
    np.testing.assert_allclose(multi.scores, [0.15, 0.10], rtol=1e-6)
    np.testing.assert_array_equal(multi.classes, [0, 1])
    np.testing.assert_allclose(multi.boxes, [[15, 15, 25, 25]] * 2)


def test_normalised_and_pixel_layouts_agree() -> None:
    hw = (200, 400)  # non-square, so a swapped axis would show
    px = decoded([(100, 50, 40, 20, 1.0, 0.0, 1.0)])
    norm = decoded([(100 / 400, 50 / 200, 40 / 400, 20 / 200, 1.0, 0.0, 1.0)])
    a = postprocess_decoded(px, hw)[0]
    b = postprocess_decoded(norm, hw, normalized=True)[0]
    np.testing.assert_allclose(a.boxes, [[80, 40, 120, 60]], atol=1e-4)
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-4)


def test_max_detections_keeps_the_best() -> None:
    rows = [(10 + 20 * i, 10, 10, 10, 1.0, 0.1 * (i + 1), 0.0) for i in range(4)]
    d = postprocess_decoded(decoded(rows), (100, 100), max_detections=2)[0]
    np.testing.assert_allclose(d.scores, [0.4, 0.3], rtol=1e-6)


def test_non_finite_boxes_are_dropped() -> None:
    rows = [(10, 10, np.inf, 10, 1.0, 0.9, 0.0), (50, 50, 10, 10, 1.0, 0.5, 0.0)]
    d = postprocess_decoded(decoded(rows), (100, 100))[0]
    np.testing.assert_allclose(d.boxes, [[45, 45, 55, 55]])


# --------------------------------------------------------------------------- SSD / BlazeFace


def test_blazeface_anchors() -> None:
    anchors = ssd_anchors()
    assert anchors.shape == (896, 4)  # 16*16*2 + 8*8*6
    np.testing.assert_allclose(anchors[0], [1 / 32, 1 / 32, 1, 1])
    np.testing.assert_allclose(anchors[1], anchors[0])  # 2 anchors per cell on the stride-8 layer
    np.testing.assert_allclose(anchors[2], [3 / 32, 1 / 32, 1, 1])
    np.testing.assert_allclose(anchors[512:518], [[1 / 16, 1 / 16, 1, 1]] * 6)  # merged stride-16 layers
    np.testing.assert_allclose(anchors[-1], [15 / 16, 15 / 16, 1, 1])


def test_decode_ssd_hand_computed_box() -> None:
    anchors = ssd_anchors()
    reg = np.zeros((1, 896, 16), np.float32)
    logits = np.full((1, 896, 1), -1000.0, np.float32)  # clipped to -100: sigmoid ~ 0
    reg[0, 512, :4] = [12.8, -6.4, 32.0, 64.0]  # anchor (1/16, 1/16)
    logits[0, 512, 0] = 0.0
    dec = decode_ssd(reg, logits, anchors, (128, 128))
    # cx = 12.8/128 + 0.0625 = 0.1625, cy = -0.05 + 0.0625 = 0.0125, w = 0.25, h = 0.5
    np.testing.assert_allclose(dec[0, 512], [20.8, 1.6, 32.0, 64.0, 1.0, 0.5], atol=1e-5)
    (d,) = postprocess_decoded(dec, (128, 128), score_threshold=0.3)
    np.testing.assert_allclose(d.boxes, [[4.8, -30.4, 36.8, 33.6]], atol=1e-4)
    np.testing.assert_array_equal(d.classes, [0])


# --------------------------------------------------------------------------- to_original


def test_to_original_undoes_a_letterbox_and_clips() -> None:
    d = dets([[10, 20, 110, 60], [300, 10, 420, 80]], [0.9, 0.8], [0, 1])
    back = to_original(d, (0.5, 0.5, 0, 0), (210, 100))  # ratio 0.5, image at top-left
    np.testing.assert_allclose(back.boxes, [[20, 40, 210, 100], [210, 20, 210, 100]])
    np.testing.assert_array_equal(back.classes, d.classes)
    shifted = to_original(dets([[12, 26, 22, 36]], [1.0], [0]), (2.0, 2.0, 2.0, 6.0), (100, 100))
    np.testing.assert_allclose(shifted.boxes, [[5, 10, 10, 15]])


# --------------------------------------------------------------------------- COCO mAP

GT = {
    "images": [
        {"id": 1, "file_name": "000000000001.jpg", "width": 200, "height": 200},
        {"id": 2, "file_name": "000000000002.jpg", "width": 200, "height": 200},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 100], "area": 5000, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [100, 100, 80, 40], "area": 3200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
}
# class index 0 -> COCO id 1 (person), class index 2 -> COCO id 3 (car)
PERFECT = {
    1: dets([[10, 10, 60, 110], [100, 100, 180, 140]], [0.9, 0.9], [0, 2]),
    2: dets([[0, 0, 30, 30]], [0.8], [0]),
}
AP_HALF_RECALL = 51 / 101  # COCO's 101-point AP when the only hits reach recall 0.5 at precision 1


def test_coco_map_perfect_is_100(tmp_path) -> None:
    res = coco_map(PERFECT, GT)
    assert res == {"map": pytest.approx(100.0), "map50": pytest.approx(100.0), "images": 2}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(GT))
    assert coco_map(PERFECT, path)["map"] == pytest.approx(100.0)
    assert coco_map(PERFECT, GT, class_ids=COCO80_IDS)["map"] == pytest.approx(100.0)


def test_coco_map_shifted_box_known_value() -> None:
    # image 2's box shifted 6 px: IoU 24/36 = 0.667, a hit at thresholds .50-.65 (4 of 10) only
    shifted = {**PERFECT, 2: dets([[6, 0, 36, 30]], [0.8], [0])}
    res = coco_map(shifted, GT)
    person = (4 + 6 * AP_HALF_RECALL) / 10
    assert res["map"] == pytest.approx((1 + person) / 2 * 100, abs=1e-6)
    assert res["map50"] == pytest.approx(100.0)


def test_coco_map_image_without_detections_still_counts() -> None:
    res = coco_map({1: PERFECT[1], 2: Detections.empty()}, GT)
    assert res["images"] == 2
    assert res["map"] == pytest.approx((1 + AP_HALF_RECALL) / 2 * 100, abs=1e-6)
    restricted = coco_map({1: PERFECT[1]}, GT)  # image 2 not run: not scored
    assert restricted == {"map": pytest.approx(100.0), "map50": pytest.approx(100.0), "images": 1}


def test_coco_map_empty_detections_is_zero() -> None:
    empty = {1: Detections.empty(), 2: Detections.empty()}
    assert coco_map(empty, GT) == {"map": 0.0, "map50": 0.0, "images": 2}
    assert coco_map({}, GT, image_ids=[1, 2]) == {"map": 0.0, "map50": 0.0, "images": 2}


def test_coco_map_bad_inputs() -> None:
    with pytest.raises(DataError, match="image id 7"):
        coco_map({7: PERFECT[1]}, GT)
    with pytest.raises(DataError, match="class index 5"):
        coco_map({1: dets([[0, 0, 1, 1]], [1.0], [5])}, GT, class_ids=[1, 3])
    with pytest.raises(DataError, match="not found"):
        coco_map(PERFECT, "/nonexistent/instances.json")


def test_coco_image_ids() -> None:
    assert coco_image_ids(GT, ["/some/dir/000000000002.jpg", "000000000001.jpg"]) == [2, 1]
    with pytest.raises(DataError, match=r"cat\.jpg \(\+1 more\)"):
        coco_image_ids(GT, ["cat.jpg", "000000000001.jpg", "dog.jpg"])


# --------------------------------------------------------------------------- label-free mAP


def test_map_vs_reference() -> None:
    reference = {
        "a.jpg": dets([[10, 10, 50, 50], [60, 60, 90, 90]], [0.9, 0.2], [3, 3]),  # 2nd is below 0.3: not GT
        "b.jpg": dets([[0, 0, 20, 20]], [0.1], [0]),  # no GT on this image, but it still counts
    }
    assert map_vs_reference(reference, reference) == {"map": 100.0, "map50": 100.0, "images": 2}
    # a confident false positive on b ranks above the only hit: precision 1/2 at recall 1
    worse = {**reference, "b.jpg": dets([[0, 0, 20, 20]], [0.95], [3])}
    assert map_vs_reference(worse, reference)["map"] == pytest.approx(50.0)
    with pytest.raises(DataError, match="missing"):
        map_vs_reference({"a.jpg": reference["a.jpg"]}, reference)
    with pytest.raises(DataError, match="reference_score_threshold"):
        map_vs_reference(reference, reference, reference_score_threshold=0.99)
