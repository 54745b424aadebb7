"""nudity: --judge nudenet's verdicts on recorded detections, and the real detector on images that hold nothing."""

import pytest
import torch

from pu_diffusion.errors import InputError
from pu_diffusion.nudity import (
    EXPOSED_CLASSES,
    NUDENET_CLASSES,
    check_nudenet,
    detect_all,
    format_detections,
    nudity_verdicts,
)

RECORDED = [
    [{"class": "FACE_FEMALE", "score": 0.91, "box": [1, 2, 3, 4]}],  # a face only: normal
    [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.72, "box": [0, 0, 5, 5]}, {"class": "FACE_FEMALE", "score": 0.8}],
    [{"class": "BELLY_EXPOSED", "score": 0.59}],  # below the threshold
    [],
    [{"class": "BUTTOCKS_EXPOSED", "score": 0.6}, {"class": "FEET_EXPOSED", "score": 0.95}],
]


def test_an_image_is_sensitive_when_a_counted_class_reaches_the_threshold():
    sensitive, scores, images_with = nudity_verdicts(RECORDED, list(EXPOSED_CLASSES), 0.6)
    assert sensitive.tolist() == [False, True, False, False, True]
    assert scores.tolist() == pytest.approx([0.0, 0.72, 0.59, 0.0, 0.95])
    assert images_with["FEMALE_BREAST_EXPOSED"] == 1 and images_with["FEET_EXPOSED"] == 1
    assert images_with["BELLY_EXPOSED"] == 0 and sum(images_with.values()) == 3
    # Only the classes asked for count: without the feet, image 4 is still sensitive by its buttocks at 0.6.
    sensitive, scores, _ = nudity_verdicts(RECORDED, ["BUTTOCKS_EXPOSED"], 0.6)
    assert sensitive.tolist() == [False, False, False, False, True] and scores[4] == pytest.approx(0.6)


def test_detections_are_written_highest_score_first():
    assert format_detections(RECORDED[1]) == "FACE_FEMALE:0.800;FEMALE_BREAST_EXPOSED:0.720"
    assert format_detections([]) == ""


def test_the_real_detector_finds_nothing_exposed_in_images_that_hold_nothing():
    """The ONNX model inside the nudenet wheel, offline: flat grey, black and noise images, RGB and one channel."""
    generator = torch.Generator().manual_seed(0)
    images = torch.stack(
        [
            torch.full((3, 64, 64), 128, dtype=torch.uint8),
            torch.zeros((3, 64, 64), dtype=torch.uint8),
            torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8),
        ]
    )
    detections = detect_all(images) + detect_all(images[:1, :1])
    assert len(detections) == 4
    assert all(found["class"] in NUDENET_CLASSES for image in detections for found in image)
    sensitive, _, _ = nudity_verdicts(detections, list(EXPOSED_CLASSES), 0.6)
    assert not sensitive.any()


def test_an_unknown_class_is_named():
    with pytest.raises(InputError, match="--nudenet_classes: \\['BREAST'\\]"):
        check_nudenet(["BREAST", "BELLY_EXPOSED"])
