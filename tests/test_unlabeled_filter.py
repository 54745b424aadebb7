"""estimate_prior.py --write_filtered_data: U without its most S-like share, written for the training scripts."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

import estimate_prior
from pu_diffusion.errors import InputError
from pu_diffusion.prior import HeldOutScores, PriorEstimate
from pu_diffusion.training_data import load_image_dataset, load_training_sets
from pu_diffusion.unlabeled_filter import (
    FilterRecord,
    check_output_folder,
    check_rule_usable,
    describe,
    drop_fraction,
    filter_unlabeled,
    kept_from_record,
    kept_indices,
    label_audit,
    write_filtered_data,
)
from tests.helpers import assert_ok, run_in_process


def test_the_highest_scores_are_dropped_and_a_tie_goes_to_the_earlier_image():
    scores = np.array([0.1, 0.9, 0.5, 0.9, 0.2])
    assert kept_indices(scores, 0.4).tolist() == [0, 2, 4]  # round(0.4 * 5) = 2: both 0.9s
    assert kept_indices(scores, 0.2).tolist() == [0, 2, 3, 4]  # one to drop: the first 0.9
    assert kept_indices(scores, 0.05).tolist() == [0, 1, 2, 3, 4]  # round(0.25) = 0


def estimate_of(value: float, low: float, high: float) -> PriorEstimate:
    return PriorEstimate(value, low, high, 0.9, "test", "pixels", 100, 10, 5)


def test_each_rule_gives_its_share():
    estimate = estimate_of(0.07, 0.03, 0.11)
    assert drop_fraction("estimate", estimate) == 0.07
    assert drop_fraction("high", estimate) == 0.11
    assert drop_fraction(0.2, estimate) == 0.2


def test_a_rule_read_off_an_unusable_estimate_is_refused_and_a_number_is_not():
    problems = ["the estimate is 1: the classifier could not tell S from U (S and U look alike)"]
    for rule in ("estimate", "high"):
        with pytest.raises(InputError, match=f"--filter_fraction {rule}: the estimate cannot be used .*look alike"):
            check_rule_usable(rule, problems)
        check_rule_usable(rule, [])
    check_rule_usable(0.1, problems)


def labeled(labels: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"label": labels, "index": list(range(len(labels)))})


def test_the_label_audit_counts_what_was_dropped():
    unlabeled = labeled(["a", "s", "a", "s", "a"])
    audit = label_audit(unlabeled, np.array([0, 3, 4]), "label", ["s"])  # dropped: 1 (s) and 2 (a)
    assert audit == {
        "sensitive_in_unlabeled": 2,
        "sensitive_dropped": 1,
        "normal_dropped": 1,
        "sensitive_share_before": 0.4,
        "sensitive_share_after": pytest.approx(1 / 3),
    }
    assert label_audit(unlabeled.remove_columns("label"), np.array([0]), "label", ["s"]) is None
    assert label_audit(unlabeled, np.array([0]), None, None) is None
    # A sensitive label that U lacks (a label split's few sensitive images) counts nothing, and is no error.
    assert label_audit(unlabeled, np.array([0, 3, 4]), "label", ["s", "t"]) == audit


def test_a_saved_filter_gives_back_its_kept_indices_on_the_same_u_only():
    record = record_for([0, 2, 3], 5).to_dict()
    assert kept_from_record(record, 5, "--filter_unlabeled").tolist() == [0, 2, 3]
    with pytest.raises(InputError, match="--filter_unlabeled: the resumed run's filter was made on 5 images"):
        kept_from_record(record, 6, "--filter_unlabeled")
    assert describe(record) == "dropped 2 of 5 images of U (high: 0.4000)"


def test_filtering_keeps_all_but_the_top_share_and_records_it():
    unlabeled = labeled(["a", "s", "a", "s", "a"])
    estimate = PriorEstimate(0.4, 0.2, 0.6, 0.9, "BBE", "pixels at 8 px", 5, 2, 2)
    kept, record = filter_unlabeled(unlabeled, 2, np.array([0.1, 0.9, 0.2, 0.8, 0.3]), estimate, "high", "label", ["s"])
    assert kept.tolist() == [0, 2] and record.dropped_indices == [1, 3, 4]  # round(0.6 * 5) = 3 dropped
    assert (record.fraction, record.unlabeled_kept, record.sensitive_images) == (0.6, 2, 2)
    assert (record.audit["sensitive_dropped"], record.audit["normal_dropped"]) == (2, 1)
    assert record.prior_estimate == estimate.to_dict()


def record_for(kept, total) -> FilterRecord:
    return FilterRecord("high", 0.4, {}, total, len(kept), 1, sorted(set(range(total)) - set(kept)))


def test_an_interrupted_write_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    unlabeled, sensitive = labeled(["a", "s", "a"]), labeled(["s"])
    folder = tmp_path / "filtered"
    write_filtered_data(folder, unlabeled, sensitive, np.array([0, 2]), record_for([0, 2], 3))
    first = json.loads((folder / "filter.json").read_text())

    def full_disk(self, path, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_disk)
    with pytest.raises(OSError):
        write_filtered_data(folder, unlabeled, sensitive, np.array([0]), record_for([0], 3))
    assert json.loads((folder / "filter.json").read_text()) == first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["filtered"]  # no staging folder left


def test_a_folder_that_holds_something_is_refused_before_any_work(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(InputError, match="--write_filtered_data .*not empty.*--overwrite_filtered_data"):
        check_output_folder(tmp_path, overwrite=False)
    check_output_folder(tmp_path, overwrite=True)
    check_output_folder(tmp_path / "new", overwrite=False)
    with pytest.raises(SystemExit):
        estimate_prior.parse_args(
            ["--train_data_dir", "u", "--sensitive_data_dir", "s", "--write_filtered_data", str(tmp_path)]
        )
    with pytest.raises(SystemExit):
        estimate_prior.parse_args(["--train_data_dir", "u", "--sensitive_data_dir", "s", "--filter_fraction", "1"])


def test_the_filtered_data_holds_u_without_its_top_scores_and_the_training_scripts_read_it(
    digits_dir, tmp_path, monkeypatch
):
    """Scores put every sensitive image of U above every normal one, so dropping U's true share removes
    exactly U's sensitive images; the written datasets are what train_pu_unconditional.py loads."""
    import train_pu_unconditional

    split = ["--dataset_name", str(digits_dir), "--label_column", "label", "--sensitive_labels", "1", "3", "5", "7"]
    split += ["9", "--resolution", "8", "--num_unlabeled_normal", "200", "--num_unlabeled_sensitive", "50"]
    split += ["--num_labeled_sensitive", "60", "--seed", "3"]
    flags = [*split, "--loss_type", "pu", "--output_dir", str(tmp_path / "unused")]
    unlabeled, sensitive = load_training_sets(train_pu_unconditional.parse_args(flags))
    is_sensitive = np.isin(unlabeled["label"], [1, 3, 5, 7, 9])
    scores = np.where(is_sensitive, 0.9, 0.1) + np.linspace(0, 0.01, len(unlabeled))

    def fixed_scores(unlabeled_seen, sensitive_seen, args, seed, vae=None, device="cpu"):
        assert len(unlabeled_seen) == len(unlabeled) and len(sensitive_seen) == len(sensitive)
        return HeldOutScores(np.full(len(sensitive_seen), 0.9), scores, "pixels at 8 px", 5)

    monkeypatch.setattr(estimate_prior, "scores_for_data", fixed_scores)
    folder = tmp_path / "filtered"
    result = run_in_process(
        "estimate_prior.py", *split, "--output_dir", tmp_path / "prior", "--write_filtered_data", folder,
        "--filter_fraction", "0.2",
    )  # fmt: skip
    assert_ok(result)
    assert "50 of its 50 sensitive images dropped, and 0 normal ones" in result.stdout

    record = json.loads((folder / "filter.json").read_text())
    assert record["fraction"] == 0.2 and record["unlabeled_kept"] == 200
    assert record["dropped_indices"] == np.flatnonzero(is_sensitive).tolist()
    assert record["audit"]["sensitive_share_after"] == 0.0 and record["sensitive_images"] == 60

    args = train_pu_unconditional.parse_args(
        ["--dataset_name", str(folder / "unlabeled"), "--sensitive_dataset_name", str(folder / "sensitive")]
        + ["--resolution", "8", "--loss_type", "pu", "--output_dir", str(tmp_path / "model")]
    )
    kept_unlabeled, kept_sensitive = load_training_sets(args)
    assert kept_unlabeled["label"] == np.asarray(unlabeled["label"])[~is_sensitive].tolist()
    assert kept_sensitive["label"] == sensitive["label"]
    first_kept = int(np.flatnonzero(~is_sensitive)[0])
    assert np.array_equal(np.asarray(kept_unlabeled[0]["image"]), np.asarray(unlabeled[first_kept]["image"]))


def test_an_image_folder_u_is_written_with_its_images_embedded(tmp_path):
    """save_to_disk embeds the images' bytes: the filtered data outlives the folder it came from."""
    source = tmp_path / "u"
    source.mkdir()
    for index in range(3):
        Image.new("L", (8, 8), 40 * index).save(source / f"{index}.png")
    unlabeled = load_image_dataset(None, str(source), name_flag="--dataset_name", dir_flag="--train_data_dir")
    folder = tmp_path / "filtered"
    write_filtered_data(folder, unlabeled, unlabeled.select([0]), np.array([1, 2]), record_for([1, 2], 3))
    for path in source.iterdir():
        path.unlink()
    kept = datasets.load_from_disk(str(folder / "unlabeled"))
    assert [np.asarray(image).max() for image in kept["image"]] == [40, 80]
