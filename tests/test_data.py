"""U/S construction, the paper's label split, transforms and the demo data."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pu_diffusion import batches
from pu_diffusion.batches import (
    INTERPOLATION_MODES,
    EpochShuffle,
    ImageTransform,
    TransformedImages,
    default_sensitive_batch_size,
    endless,
)
from pu_diffusion.errors import InputError
from pu_diffusion.training_data import (
    drop_unlabeled_rows,
    limit_unlabeled,
    load_image_dataset,
    normal_reference_split,
    resolve_label_values,
    sensitive_mask,
    split_by_label,
)
from tests.helpers import write_image_folder

ODD = ["1", "3", "5", "7", "9"]


def test_digits_dataset_has_stratified_train_and_test_splits(digits_dir):
    loaded = datasets.load_dataset(str(digits_dir))
    assert {split: len(loaded[split]) for split in loaded} == {"train": 1437, "test": 360}
    assert loaded["train"].features["label"].names == [str(d) for d in range(10)]
    image = loaded["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    # 1797 digits split 80/20 per class: every class keeps about a fifth in test.
    test_counts = np.bincount(loaded["test"]["label"], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37


def test_split_by_label_counts_are_exact_disjoint_and_seeded():
    is_sensitive = np.array([False] * 50 + [True] * 30)
    split = split_by_label(is_sensitive, 40, 4, 6, seed=1)
    assert (len(split.unlabeled_normal), len(split.unlabeled_sensitive), len(split.labeled_sensitive)) == (40, 4, 6)
    assert not is_sensitive[split.unlabeled_normal].any()
    assert is_sensitive[split.unlabeled_sensitive].all() and is_sensitive[split.labeled_sensitive].all()
    assert not set(split.unlabeled) & set(split.labeled_sensitive)
    assert len(set(split.unlabeled)) == 44
    again = split_by_label(is_sensitive, 40, 4, 6, seed=1)
    other = split_by_label(is_sensitive, 40, 4, 6, seed=2)
    assert np.array_equal(split.labeled_sensitive, again.labeled_sensitive)
    assert not np.array_equal(split.unlabeled_normal, other.unlabeled_normal)


def test_split_by_label_defaults_follow_the_papers_ratio():
    split = split_by_label(np.array([False] * 100 + [True] * 50), seed=0)
    assert (len(split.unlabeled_normal), len(split.unlabeled_sensitive), len(split.labeled_sensitive)) == (100, 10, 10)


@pytest.mark.parametrize(
    ("counts", "flag"),
    [
        ((101, 1, 1), "--num_unlabeled_normal"),
        ((10, 30, 30), "--num_labeled_sensitive"),
        ((-1, 1, 1), "--num_unlabeled_normal"),
        ((0, 0, 5), "U would be empty"),
    ],
)
def test_split_by_label_rejects_counts_beyond_the_data(counts, flag):
    with pytest.raises(InputError, match=flag):
        split_by_label(np.array([False] * 100 + [True] * 50), *counts)


def test_labels_resolve_by_class_name_or_id_and_unknown_labels_are_named(digits_dir):
    train = datasets.load_dataset(str(digits_dir), split="train")
    assert resolve_label_values(train, "label", ["1", "3"]) == {1, 3}
    with pytest.raises(InputError, match="--sensitive_labels: label '11'"):
        resolve_label_values(train, "label", ["11"])
    plain = datasets.Dataset.from_dict({"kind": ["cat", "dog", "cat"]})
    assert sensitive_mask(plain, "kind", ["dog"]).tolist() == [False, True, False]


def test_normal_reference_split_is_the_normal_part_of_the_test_split(digits_dir):
    reference = normal_reference_split(str(digits_dir), "label", ODD)
    labels = reference["label"]
    assert set(labels) == {0, 2, 4, 6, 8}
    test = datasets.load_dataset(str(digits_dir), split="test")
    assert len(reference) == sum(1 for label in test["label"] if label % 2 == 0)


def test_image_folder_loading_and_its_errors(tmp_path):
    folder = write_image_folder(tmp_path / "u", 5)
    assert len(load_image_dataset(None, str(folder), name_flag="--dataset_name", dir_flag="--train_data_dir")) == 5
    with pytest.raises(InputError, match="--sensitive_data_dir .*no such folder"):
        load_image_dataset(
            None, str(tmp_path / "nope"), name_flag="--sensitive_dataset_name", dir_flag="--sensitive_data_dir"
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="--sensitive_data_dir .*holds no files"):
        load_image_dataset(
            None, str(tmp_path / "empty"), name_flag="--sensitive_dataset_name", dir_flag="--sensitive_data_dir"
        )
    with pytest.raises(InputError, match="--dataset_name .*could not load"):
        load_image_dataset(str(tmp_path / "missing"), None, name_flag="--dataset_name", dir_flag="--train_data_dir")


def test_image_transform_scales_to_minus_one_one_and_picks_channels():
    pixels = np.zeros((12, 16, 3), dtype=np.uint8)
    pixels[:, :8] = 255  # left half white
    image = Image.fromarray(pixels)
    gray = ImageTransform(8, channels=1, center_crop=True)(image)
    rgb = ImageTransform(8, channels=3, center_crop=True)(image)
    assert gray.shape == (1, 8, 8) and rgb.shape == (3, 8, 8)
    assert gray.min().item() == -1.0 and gray.max().item() == 1.0
    # Shorter side 12 -> 8 gives 11x8 (w x h); the centre crop keeps columns 1..8 of 11.
    assert gray[0, :, 0].tolist() == [1.0] * 8 and gray[0, :, -1].tolist() == [-1.0] * 8


def test_random_flip_is_seeded_by_torch():
    image = Image.fromarray(np.tile(np.arange(8, dtype=np.uint8) * 30, (8, 1)))
    transform = ImageTransform(8, channels=1, center_crop=True, random_flip=True)
    torch.manual_seed(0)
    first = [transform(image)[0, 0, 0].item() for _ in range(20)]
    torch.manual_seed(0)
    assert [transform(image)[0, 0, 0].item() for _ in range(20)] == first
    assert len(set(first)) == 2  # both orientations occur


def test_default_sensitive_batch_size_is_the_mixed_loader_average():
    assert default_sensitive_batch_size(128, num_unlabeled=792, num_sensitive=72) == 12  # round(11.6)
    assert default_sensitive_batch_size(16, num_unlabeled=80, num_sensitive=20) == 4


def test_default_sensitive_batch_size_has_a_floor_of_four_within_the_u_batch_and_s():
    assert default_sensitive_batch_size(16, num_unlabeled=240, num_sensitive=20) == 4  # 1.33 alone
    assert default_sensitive_batch_size(4, num_unlabeled=1000, num_sensitive=10) == 4  # 0.04 alone
    assert default_sensitive_batch_size(2, num_unlabeled=1000, num_sensitive=10) == 2  # not above the U batch
    assert default_sensitive_batch_size(16, num_unlabeled=1000, num_sensitive=3) == 3  # not above |S|
    assert default_sensitive_batch_size(1, num_unlabeled=1000, num_sensitive=10) == 1


class IndexOf(torch.utils.data.Dataset):
    """Six items; each is its own index."""

    def __len__(self):
        return 6

    def __getitem__(self, key):
        return key[0]


def test_endless_stream_reshuffles_each_pass_and_restarts_where_it_stopped():
    def stream(start_batch=0):
        sampler = EpochShuffle(6, seed=3)
        loader = torch.utils.data.DataLoader(IndexOf(), batch_size=2, sampler=sampler, collate_fn=list)
        return endless(loader, sampler, start_batch)

    uninterrupted = stream()
    batches = [next(uninterrupted) for _ in range(12)]  # four passes of three batches
    passes = [sum(batches[i : i + 3], []) for i in range(0, 12, 3)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    resumed = stream(start_batch=5)
    assert [next(resumed) for _ in range(7)] == batches[5:]


def test_augmentation_depends_on_seed_epoch_and_index_only(digits_dir):
    train = datasets.load_dataset(str(digits_dir), split="train").select(range(4))
    images = TransformedImages(train, "image", ImageTransform(6, 1, random_flip=True), seed=7)
    first = [images[(i, 2)] for i in (3, 0, 1)]
    torch.manual_seed(123)  # the global generator plays no part
    again = [images[(i, 2)] for i in (1, 0, 3)][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, [again[0], again[1], again[2]], strict=True))
    crops = {tuple(images[(0, epoch)].flatten().tolist()) for epoch in range(8)}
    assert len(crops) > 1  # another epoch, another crop or flip


def test_preloaded_images_equal_the_ones_decoded_on_access(digits_dir, monkeypatch):
    train = datasets.load_dataset(str(digits_dir), split="train").select(range(6))
    transform = ImageTransform(6, 1, random_flip=True)
    preloaded = TransformedImages(train, "image", transform, seed=4)
    monkeypatch.setattr(batches, "PRELOAD_BUDGET_BYTES", 0)
    on_access = TransformedImages(train, "image", transform, seed=4)
    assert preloaded.prepared is not None and on_access.prepared is None
    for key in [(0, 0), (5, 0), (5, 3), (2, 9)]:
        assert torch.equal(preloaded[key], on_access[key])


# --------------------------------------------------------------------------- messy inputs


def test_rows_without_a_label_are_left_out_with_a_warning(caplog):
    plain = datasets.Dataset.from_dict({"kind": ["cat", None, "dog", None, "cat"]})
    with caplog.at_level("WARNING"):
        kept = drop_unlabeled_rows(plain, "kind", "--dataset_name pets")
    assert kept["kind"] == ["cat", "dog", "cat"]
    assert "2 row(s) have no --label_column 'kind' value (e.g. rows 1, 3)" in caplog.text


def test_numeric_labels_match_by_number_and_the_error_lists_the_values():
    floats = datasets.Dataset.from_dict({"label": [0.0, 1.0, 1.0, 2.0]})
    assert resolve_label_values(floats, "label", ["1"]) == {1.0}
    assert sensitive_mask(floats, "label", ["1", "2.0"]).tolist() == [False, True, True, True]
    with pytest.raises(InputError, match=r"label '7' does not occur in column 'label'; its values are 0.0, 1.0, 2.0"):
        resolve_label_values(floats, "label", ["7"])


@pytest.mark.parametrize("mode", ["bicubic", "lanczos", "nearest"])
def test_interpolation_mode_is_the_pil_filter_that_resizes(mode):
    """--image_interpolation_mode: the shorter side goes to the resolution through that PIL filter."""
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    resized = ImageTransform(8, channels=3, center_crop=True, interpolation=mode).prepare(image)
    expected = np.array(image.resize((8, 8), INTERPOLATION_MODES[mode]))
    assert torch.equal(resized, torch.from_numpy(expected).permute(2, 0, 1))
    bilinear = ImageTransform(8, channels=3, center_crop=True).prepare(image)
    assert not torch.equal(resized, bilinear)


def test_max_train_samples_keeps_a_seeded_subset_of_u():
    unlabeled = datasets.Dataset.from_dict({"index": list(range(50))})
    first = limit_unlabeled(unlabeled, 10, seed=3)
    assert len(first) == 10 and len(set(first["index"])) == 10
    assert first["index"] == limit_unlabeled(unlabeled, 10, seed=3)["index"]
    assert first["index"] != limit_unlabeled(unlabeled, 10, seed=4)["index"]
    assert limit_unlabeled(unlabeled, 50, seed=3) is unlabeled and limit_unlabeled(unlabeled, None, 3) is unlabeled
