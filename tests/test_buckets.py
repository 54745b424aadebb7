"""buckets: --aspect_ratio_buckets, from the flag's text to batches of one size, in pixels and cached latents."""

import argparse

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pu_diffusion.batches import CaptionedImages, ImageTransform
from pu_diffusion.buckets import BucketBatches, Bucketing, count_batches, nearest_bucket, parse_buckets
from pu_diffusion.errors import InputError
from pu_diffusion.latent_cache import CachedLatents
from pu_diffusion.training_data import load_image_dataset

BUCKETS = [(16, 16), (8, 16), (16, 8)]


def test_the_flag_reads_diffusers_syntax_and_names_what_is_wrong():
    assert parse_buckets("512,512; 384,640;640,384;") == [(512, 512), (384, 640), (640, 384)]
    for text, message in [("512x512", "'512x512' is not HEIGHT,WIDTH"), ("0,8", "'0,8'"), (";", "no bucket")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_buckets(text)


def test_an_image_goes_to_the_bucket_nearest_its_aspect_ratio_on_a_log_scale():
    # log(h / w): 100 x 200 is -0.69; the buckets are 0, -0.69 and +0.69.
    assert nearest_bucket(100, 200, BUCKETS) == (8, 16)
    assert nearest_bucket(300, 100, BUCKETS) == (16, 8)
    assert nearest_bucket(90, 100, BUCKETS) == (16, 16)
    # 1:1.40 is nearer 1:1 than 1:2 on a log scale (0.336 against 0.357), though nearer 1:2 in h / w.
    assert nearest_bucket(100, 140, BUCKETS) == (16, 16)
    assert nearest_bucket(100, 140, [(8, 16), (16, 16)]) == (16, 16)
    assert nearest_bucket(50, 50, [(8, 8), (16, 16)]) == (8, 8)  # a tie: the first listed


def write_images(folder, sizes):
    folder.mkdir()
    for index, (height, width) in enumerate(sizes):
        Image.new("RGB", (width, height), (index * 20, 0, 0)).save(folder / f"{index:02d}.png")
    return folder


def test_buckets_come_from_the_file_headers_of_a_folder_and_of_images_held_in_the_dataset(tmp_path):
    sizes = [(30, 30), (20, 41), (50, 24), (32, 32)]
    folder_dir = str(write_images(tmp_path / "u", sizes))
    folder = load_image_dataset(None, folder_dir, name_flag="--dataset_name", dir_flag="--train_data_dir")
    in_memory = datasets.Dataset.from_dict({"image": [Image.new("RGB", (w, h)) for h, w in sizes[:2]]})
    bucketing = Bucketing.of(BUCKETS, 8, {"U": folder, "S": in_memory, "none": None}, "image")
    assert bucketing.target_sizes == {"U": [(16, 16), (8, 16), (16, 8), (16, 16)], "S": [(16, 16), (8, 16)]}
    assert bucketing.describe() == "U: 16x16 2, 8x16 1, 16x8 1; S: 16x16 1, 8x16 1"
    assert bucketing.num_batches("U", 2) == 3  # 16x16: one full batch; 8x16 and 16x8: one short batch each


def test_a_phone_photo_turned_by_its_exif_orientation_gets_the_bucket_of_the_way_it_is_decoded(tmp_path):
    """Stored 40 x 20 (landscape) with orientation 6 (turn a quarter): decoded, and so trained, 20 x 40."""
    folder = tmp_path / "photos"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(folder / "turned.jpg", exif=exif)
    Image.new("RGB", (40, 20)).save(folder / "upright.jpg")
    dataset = load_image_dataset(None, str(folder), name_flag="--dataset_name", dir_flag="--train_data_dir")
    decoded = [(image.height, image.width) for image in dataset["image"]]
    bucketing = Bucketing.of(BUCKETS, 8, {"U": dataset}, "image")
    assert sorted(decoded) == [(20, 40), (40, 20)]
    expected = [nearest_bucket(*size, BUCKETS) for size in decoded]
    assert bucketing.target_sizes["U"] == expected and sorted(expected) == [(8, 16), (16, 8)]


def test_a_bucket_off_the_vae_grid_is_refused_before_any_image_is_read():
    with pytest.raises(InputError, match="--aspect_ratio_buckets: 12,16 not a multiple of 8"):
        Bucketing.of([(16, 16), (12, 16)], 8, {"U": None}, "image")


def test_batches_hold_one_bucket_cover_every_image_once_and_depend_on_seed_and_epoch_alone():
    sizes = [BUCKETS[index % 3] for index in range(11)]  # 4, 4 and 3 images
    sampler = BucketBatches(sizes, 3, seed=5)
    epochs = []
    for epoch in range(3):
        sampler.use_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == count_batches(sizes, 3) == 2 + 2 + 1
        assert all({key[1] for key in batch} == {epoch} for batch in batches)
        assert all(len({sizes[index] for index, _ in batch}) == 1 for batch in batches)
        assert sorted(index for batch in batches for index, _ in batch) == list(range(11))
        assert sorted(len(batch) for batch in batches) == [1, 1, 3, 3, 3]  # each bucket's last batch is short
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    again = BucketBatches(sizes, 3, seed=5)
    again.use_epoch(1)
    assert list(again) == epochs[1]  # a resumed run, or another process, replays the epoch


def bucketed_images(center_crop: bool = True, random_flip: bool = False, micro_conditioning: bool = False):
    """Three images of 12 x 24, 24 x 12 and 10 x 10 px in the buckets 8 x 16, 16 x 8 and 16 x 16."""
    rng = np.random.default_rng(0)
    shapes = [(12, 24), (24, 12), (10, 10)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    return CaptionedImages(
        datasets.Dataset.from_dict({"image": images}),
        "image",
        ImageTransform(32, 3, center_crop=center_crop, random_flip=random_flip),
        ["a", "b", "c"],
        lambda caption: torch.tensor([ord(caption)]),
        micro_conditioning=micro_conditioning,
        seed=3,
        target_sizes=[(8, 16), (16, 8), (16, 16)],
    )


def test_each_image_is_resized_to_cover_its_bucket_and_cropped_to_it_with_sdxl_conditioning_to_match():
    images = bucketed_images(center_crop=False, micro_conditioning=True)
    # 12 x 24 -> 8 x 16 exactly (no crop); 24 x 12 -> 16 x 8; 10 x 10 enlarged to 16 x 16.
    assert [tuple(images.prepared_image(index).shape[-2:]) for index in range(3)] == [(8, 16), (16, 8), (16, 16)]
    for index, size in enumerate([(8, 16), (16, 8), (16, 16)]):
        item = images[(index, 0)]
        assert tuple(item["pixel_values"].shape) == (3, *size)
        original = [(12, 24), (24, 12), (10, 10)][index]
        assert item["time_ids"].tolist() == [*original, 0, 0, *size]  # original size, crop top-left, target size
    wide = Image.fromarray(np.zeros((8, 40, 3), dtype=np.uint8))
    transform = ImageTransform(32, 3, center_crop=True)
    assert tuple(transform.prepare(wide, (8, 16)).shape) == (3, 8, 40)  # height covers, the width is cropped
    assert transform.crop_offset((8, 40), None, (8, 16)) == (0, 12)


def test_cached_latents_keep_one_tensor_per_bucket_and_serve_each_image_its_own(tmp_path):
    images = bucketed_images(random_flip=True)

    def encode(pixels):
        return torch.cat([pixels, -pixels], dim=1)

    cached = CachedLatents(images, encode, batch_size=2, folder=str(tmp_path), show_progress=False, memory_budget=0)
    assert sorted(cached.parameters) == [(8, 16), (16, 8), (16, 16)]
    assert len(list(tmp_path.glob(".tmp-latent-cache-*"))) == 3  # one file per bucket, named for it
    assert cached.target_sizes == images.target_sizes
    for epoch in range(3):
        for index in range(3):
            expected = encode(images[(index, epoch)]["pixel_values"][None])[0]
            assert torch.equal(cached[(index, epoch)]["latent_parameters"], expected)


def shards_of(sizes, batch_size: int) -> list[list[list[tuple[int, int]]]]:
    """What each of two processes gets from Accelerate's sharding of a bucket loader: its batches' sizes."""
    from accelerate.data_loader import prepare_data_loader

    keyed = {(index, 0): size for index, size in enumerate(sizes)}  # the loader's keys are (index, epoch)
    loader = DataLoader(keyed, batch_sampler=BucketBatches(sizes, batch_size, seed=0))
    return [
        [list(zip(*(column.tolist() for column in batch), strict=True)) for batch in shard]
        for shard in (prepare_data_loader(loader, num_processes=2, process_index=rank) for rank in (0, 1))
    ]


def test_accelerate_shards_bucket_batches_whole_across_processes():
    """Two processes each get whole batches of one bucket, together every batch once; an odd batch count is
    evened by repeating a whole batch from the start, never by mixing buckets."""
    sizes = [(32, 32)] * 4 + [(32, 48)] * 3  # 2 + 2 batches of 2
    shards = shards_of(sizes, 2)
    assert [len(shard) for shard in shards] == [2, 2]
    batches = [batch for shard in shards for batch in shard]
    assert all(len(set(batch)) == 1 for batch in batches)
    assert sorted(size for batch in batches for size in batch) == sorted(sizes)

    odd = shards_of(sizes[:6], 2)  # 2 + 1 batches
    assert [len(shard) for shard in odd] == [2, 2]
    assert all(len(set(batch)) == 1 for shard in odd for batch in shard)
