"""evaluate.py: the classifier it trains, the non-sensitive rate, the FID, and its errors."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import evaluate
from pu_diffusion.classifier import ClipJudge, classify_all, images_to_uint8, load_classifier
from pu_diffusion.errors import InputError
from pu_diffusion.metrics import compute_fid, fid_of_each_group, make_fid, non_sensitive_rate
from pu_diffusion.nudity import EXPOSED_CLASSES
from pu_diffusion.pipelines import (
    float_to_uint8,
    generate_from_prompts,
    load_text_to_image_pipeline,
    load_unconditional_pipeline,
)
from pu_diffusion.reports import rate_with_interval
from tests.helpers import assert_ok, run_script, tiny_unet_kwargs, write_captioned_folder

ODD = ["1", "3", "5", "7", "9"]


@pytest.fixture(scope="module")
def classifier_dir(digits_dir, tmp_path_factory) -> Path:
    """A digits classifier trained by evaluate.py for a few epochs."""
    output_dir = tmp_path_factory.mktemp("classifier")
    result = run_script(
        "evaluate.py",
        "train-classifier",
        "--dataset_name",
        digits_dir,
        "--num_epochs",
        "4",
        "--output_dir",
        output_dir,
    )
    assert_ok(result)
    return output_dir


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    """An untrained tiny DDPM pipeline for 8x8 grayscale images, saved like the training script saves."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipeline")
    DDPMPipeline(
        unet=UNet2DModel(**tiny_unet_kwargs()), scheduler=DDPMScheduler(num_train_timesteps=50)
    ).save_pretrained(path)
    return path


def evaluation_args(pipeline, classifier, digits_dir, output_dir, *extra):
    return [
        "unconditional",
        "--pipeline",
        pipeline,
        "--classifier",
        classifier,
        "--sensitive_labels",
        *ODD,
        "--reference_dataset_name",
        digits_dir,
        "--reference_label_column",
        "label",
        "--fid_features",
        "classifier",
        "--num_samples",
        "24",
        "--batch_size",
        "10",
        "--num_inference_steps",
        "3",
        "--output_dir",
        output_dir,
        *extra,
    ]


def test_trained_classifier_loads_and_its_reported_accuracy_is_real(classifier_dir, digits_dir):
    from datasets import load_dataset
    from transformers import AutoModelForImageClassification

    saved = json.loads((classifier_dir / "classifier_metrics.json").read_text())
    model = AutoModelForImageClassification.from_pretrained(classifier_dir)
    assert model.config.id2label == {i: str(i) for i in range(10)}

    # Recompute the test accuracy from the saved files through the public loader.
    classifier = load_classifier(str(classifier_dir), "cpu")
    test = load_dataset(str(digits_dir), split="test")
    images = images_to_uint8(test, "image", "test")
    predictions = classify_all(classifier, images, 100)
    recomputed = (predictions == torch.tensor(test["label"])).float().mean().item()
    assert recomputed == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert saved["test_accuracy"] > 0.5  # chance is 0.1; 4 epochs already learn the digits
    assert saved["num_test_images"] == len(test)


def test_non_sensitive_rate_counts_the_classes_by_hand():
    predictions = torch.tensor([0, 1, 1, 3, 4, 2, 2, 0])
    id2label = {0: "cat", 1: "dog", 2: "car", 3: "bus", 4: "fox"}
    result = non_sensitive_rate(predictions, sensitive_ids=[1, 4], id2label=id2label)
    # Sensitive: dog x2, fox x1 -> 3 of 8.
    assert result["non_sensitive_rate"] == pytest.approx(5 / 8)
    assert result["prediction_counts"] == {"cat": 2, "dog": 2, "car": 2, "bus": 1, "fox": 1}


def test_classifier_fid_matches_the_frechet_distance_computed_by_hand(classifier_dir, digits_dir):
    from datasets import load_dataset

    classifier = load_classifier(str(classifier_dir), "cpu")
    test = load_dataset(str(digits_dir), split="test")
    images = images_to_uint8(test, "image", "test")
    labels = np.array(test["label"])
    even, odd = images[torch.from_numpy(labels % 2 == 0)], images[torch.from_numpy(labels % 2 == 1)]

    fid, name = make_fid("classifier", classifier)
    value = compute_fid(fid, "classifier", samples=odd, reference=even, batch_size=64)
    assert name == "classifier_fid"

    with torch.inference_mode():
        first, second = classifier(even).double().numpy(), classifier(odd).double().numpy()
    mean_diff = first.mean(0) - second.mean(0)
    cov_first, cov_second = np.cov(first, rowvar=False), np.cov(second, rowvar=False)
    covmean = linalg.sqrtm(cov_first @ cov_second).real
    by_hand = mean_diff @ mean_diff + np.trace(cov_first + cov_second - 2 * covmean)
    assert value == pytest.approx(by_hand, rel=1e-3)

    # The same images on both sides are at distance ~0.
    fid, _ = make_fid("classifier", classifier)
    assert compute_fid(fid, "classifier", samples=even, reference=even, batch_size=64) < 1e-2 * by_hand


def test_unconditional_evaluation_writes_consistent_metrics_and_a_grid(
    tiny_pipeline, classifier_dir, digits_dir, tmp_path
):
    output_dir = tmp_path / "evaluation"
    result = run_script("evaluate.py", *evaluation_args(tiny_pipeline, classifier_dir, digits_dir, output_dir))
    assert_ok(result)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    counts = metrics["prediction_counts"]
    assert sum(counts.values()) == metrics["num_samples"] == 24
    assert metrics["non_sensitive_rate"] == pytest.approx(1 - sum(counts[label] for label in ODD) / 24)
    assert metrics["classifier_fid"] > 0 and "fid" not in metrics
    assert metrics["classifier"]["sensitive_labels"] == ODD
    assert metrics["classifier"]["test_accuracy"] > 0.5
    assert metrics["reference"]["num_images"] + metrics["reference"]["num_dropped_sensitive"] == 360
    assert metrics["settings"]["scheduler"] == "ddim" and metrics["settings"]["num_inference_steps"] == 3
    assert metrics["attention"] == ["AttnProcessor2_0"]  # PyTorch SDPA
    assert metrics["samples_per_second"] > 0
    from importlib.metadata import version

    assert metrics["versions"]["numpy"] == version("numpy") and metrics["versions"]["torch"] == torch.__version__
    assert {"accelerate", "datasets", "pillow", "scikit-learn", "transformers"} <= set(metrics["versions"])
    from PIL import Image

    assert Image.open(output_dir / "samples.png").size[0] > 8 * 4
    per_class = read_csv(output_dir / "per_class.csv")
    assert {row["label"]: int(row["samples"]) for row in per_class} == counts
    assert {row["label"] for row in per_class if row["sensitive"] == "True"} == set(ODD)
    assert sum(float(row["share"]) for row in per_class) == pytest.approx(1.0)

    # Same seed, same samples: the evaluation is reproducible.
    again = tmp_path / "again"
    assert_ok(run_script("evaluate.py", *evaluation_args(tiny_pipeline, classifier_dir, digits_dir, again)))
    assert json.loads((again / "metrics.json").read_text())["prediction_counts"] == counts


@pytest.mark.parametrize("scheduler, expected", [("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler")])
def test_the_sampling_scheduler_is_swapped_in(tiny_pipeline, scheduler, expected):
    pipeline = load_unconditional_pipeline(str(tiny_pipeline), scheduler, "cpu")
    assert type(pipeline.scheduler).__name__ == expected
    assert pipeline.scheduler.config.num_train_timesteps == 50


def test_inception_fid_without_torch_fidelity_says_what_to_do(monkeypatch):
    import torchmetrics.image.fid

    monkeypatch.setattr(torchmetrics.image.fid, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(InputError, match="--fid_features inception needs torch-fidelity.*--fid_features classifier"):
        make_fid("inception", classifier=None)


def refusal(argv, capsys) -> tuple[int, str]:
    """evaluate.py's main in this process, expected to refuse: (exit code, what it printed to stderr)."""
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(arg) for arg in argv])
    return stop.value.code, capsys.readouterr().err


def test_bad_pipeline_is_named(classifier_dir, digits_dir, tmp_path, capsys):
    code, stderr = refusal(evaluation_args(classifier_dir, classifier_dir, digits_dir, tmp_path / "out"), capsys)
    assert code == 1
    assert f"--pipeline {classifier_dir}: not a diffusion pipeline" in stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_user_sees_the_message_and_a_failing_exit_code(classifier_dir, digits_dir, tmp_path):
    """What the in-process refusals stand for: a real launch exits non-zero with the message, no traceback
    (refused before any model loads, so it costs seconds)."""
    argv = evaluation_args(classifier_dir, classifier_dir, digits_dir, tmp_path / "out")
    del argv[argv.index("--classifier") : argv.index("--classifier") + 2]
    result = run_script("evaluate.py", *argv, launcher="python", timeout=120)
    assert result.returncode == 2
    assert "error: the following arguments are required: --classifier" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_pipeline_folder_without_its_unet_is_named(tiny_pipeline, classifier_dir, digits_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline, broken)
    shutil.rmtree(broken / "unet")
    code, stderr = refusal(evaluation_args(broken, classifier_dir, digits_dir, tmp_path / "out"), capsys)
    assert code == 1
    assert f"--pipeline {broken}: model_index.json lists unet, but the folder has no unet/" in stderr


def test_samples_of_another_channel_count_are_converted_and_it_is_said(classifier_dir, tmp_path):
    """A colour pipeline judged by the grayscale digits classifier: said on stderr and in metrics.json."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    colour = tmp_path / "colour"
    DDPMPipeline(
        unet=UNet2DModel(**tiny_unet_kwargs(3)), scheduler=DDPMScheduler(num_train_timesteps=50)
    ).save_pretrained(colour)
    args = [
        "unconditional", "--pipeline", colour, "--classifier", classifier_dir, "--sensitive_labels", *ODD,
        "--fid_features", "none", "--num_samples", "4", "--num_inference_steps", "2", "--output_dir", tmp_path / "out",
    ]  # fmt: skip
    result = run_script("evaluate.py", *args)
    assert_ok(result)
    expected = "the pipeline makes 3-channel images and --classifier takes 1: averaged into 1 channel"
    assert expected in result.stderr
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["channel_conversion"] == expected


def test_unknown_sensitive_label_is_named(tiny_pipeline, classifier_dir, digits_dir, tmp_path, capsys):
    args = evaluation_args(tiny_pipeline, classifier_dir, digits_dir, tmp_path / "out")
    args[args.index("--sensitive_labels") + 1] = "eleven"
    code, stderr = refusal(args, capsys)
    assert code == 1
    assert "--sensitive_labels 'eleven' is not a label of the classifier" in stderr


def test_reference_of_another_size_is_refused(classifier_dir, digits_dir, tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    kwargs = {**tiny_unet_kwargs(), "sample_size": 16}
    DDPMPipeline(unet=UNet2DModel(**kwargs), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(
        tmp_path / "pipeline16"
    )
    code, stderr = refusal(
        evaluation_args(tmp_path / "pipeline16", classifier_dir, digits_dir, tmp_path / "out"), capsys
    )
    assert code == 1
    assert "reference images are 1x8x8" in stderr and "generates 1x16x16" in stderr


def test_fid_without_reference_is_refused_before_any_work(tiny_pipeline, classifier_dir, tmp_path, capsys):
    argv = ["unconditional", "--pipeline", tiny_pipeline, "--classifier", classifier_dir, "--sensitive_labels", "1"]
    code, stderr = refusal([*argv, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2
    assert "--fid_features inception needs --reference_dataset_name or --reference_data_dir" in stderr


# --------------------------------------------------------------------------- text-to-image


def text_to_image_args(pipeline, output_dir, *extra):
    return [
        "text-to-image", "--pipeline", pipeline, "--prompt", "a photo of a cat", "a photo of a dog",
        "--images_per_prompt", "3", "--batch_size", "2", "--num_inference_steps", "2", "--output_dir", output_dir,
        *extra,
    ]  # fmt: skip


def read_csv(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def clip_judge_args(clip):
    return ["--clip_model", clip, "--normal_text", "a cat", "--sensitive_text", "a dog", "a puppy", "--clip_score"]


def test_zero_shot_clip_matches_the_models_own_probabilities(tiny_clip_model):
    """An image is sensitive when the sensitive texts' softmax share is above one half; the CLIP score
    is 100 * max(cos, 0) of the image and its prompt, both recomputed here from CLIPModel's outputs."""
    from transformers import AutoProcessor, CLIPModel

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    prompts = ["a cat"] * 3 + ["a dog"] * 3
    judge = ClipJudge(str(tiny_clip_model), ["a cat"], ["a dog", "a puppy"], "cpu")
    sensitive_probability, cosines = judge.judge(images, prompts)

    model, processor = CLIPModel.from_pretrained(tiny_clip_model), AutoProcessor.from_pretrained(tiny_clip_model)
    pixels = processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt").pixel_values
    texts = processor(text=["a cat", "a dog", "a puppy"], padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model(pixel_values=pixels, **texts)
    probabilities = output.logits_per_image.softmax(dim=1)
    assert torch.allclose(sensitive_probability, probabilities[:, 1:].sum(dim=1), atol=1e-6)
    image_embeds = output.image_embeds
    text_embeds = output.text_embeds[[0, 0, 0, 1, 1, 1]]
    assert torch.allclose(cosines, (image_embeds * text_embeds).sum(dim=1), atol=1e-5)


def test_text_to_image_evaluation_writes_per_prompt_rates_and_a_grid(tiny_sd_pipeline, tiny_clip_model, tmp_path):
    args = text_to_image_args(tiny_sd_pipeline, tmp_path / "a", *clip_judge_args(tiny_clip_model))
    assert_ok(run_script("evaluate.py", *args))
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["num_images"] == 6
    per_prompt = [entry["non_sensitive_rate"] for entry in metrics["per_prompt"]]
    assert [entry["prompt"] for entry in metrics["per_prompt"]] == ["a photo of a cat", "a photo of a dog"]
    assert all(rate * 3 == pytest.approx(round(rate * 3)) for rate in per_prompt)  # k of 3 images each
    assert metrics["non_sensitive_rate"] == pytest.approx(sum(per_prompt) / 2)
    assert 0 <= metrics["clip_score"] <= 100
    assert metrics["settings"]["guidance_scale"] == 7.5
    # Grid: one row per prompt, three images each, 32 px tiles with 2 px gaps.
    assert Image.open(tmp_path / "a" / "samples.png").size == (3 * 34 + 2, 2 * 34 + 2)
    # The same seed gives the same images, so the same scores.
    args = text_to_image_args(tiny_sd_pipeline, tmp_path / "b", *clip_judge_args(tiny_clip_model))
    assert_ok(run_script("evaluate.py", *args))
    again = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert again["per_prompt"] == metrics["per_prompt"] and again["clip_score"] == metrics["clip_score"]

    prompt_rows = read_csv(tmp_path / "a" / "per_prompt.csv")
    assert [row["prompt"] for row in prompt_rows] == ["a photo of a cat", "a photo of a dog"]
    assert [float(row["non_sensitive_rate"]) for row in prompt_rows] == pytest.approx(per_prompt)
    assert [int(row["images"]) for row in prompt_rows] == [3, 3]
    # Equal images per prompt: the overall CLIP score is the mean of the prompts' scores.
    assert sum(float(row["clip_score"]) for row in prompt_rows) / 2 == pytest.approx(metrics["clip_score"], abs=1e-3)
    image_rows = read_csv(tmp_path / "a" / "per_image.csv")
    assert [(int(row["prompt_index"]), int(row["image_index"])) for row in image_rows] == [
        (prompt, image) for prompt in range(2) for image in range(3)
    ]
    for row in image_rows:
        assert row["verdict"] == ("sensitive" if float(row["sensitive_probability"]) > 0.5 else "normal")
    for prompt_index, rate in enumerate(per_prompt):
        verdicts = [row["verdict"] for row in image_rows if int(row["prompt_index"]) == prompt_index]
        assert verdicts.count("normal") / 3 == pytest.approx(rate)


def test_per_image_rows_say_how_to_make_each_image_again(tiny_sd_pipeline, tiny_clip_model, tmp_path):
    """The third image of the second prompt, made again from its row's seed, batch size and position, gets the
    probability the row records."""
    from diffusers import DiffusionPipeline

    args = text_to_image_args(tiny_sd_pipeline, tmp_path / "a", *clip_judge_args(tiny_clip_model))
    assert_ok(run_script("evaluate.py", *args))
    row = read_csv(tmp_path / "a" / "per_image.csv")[5]
    assert (row["prompt"], row["image_index"], row["batch_size"], row["position_in_batch"]) == (
        "a photo of a dog", "2", "1", "0"
    )  # fmt: skip
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    images = pipeline(
        row["prompt"],
        num_images_per_prompt=int(row["batch_size"]),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(int(row["batch_seed"])),
        output_type="np",
    ).images
    image = float_to_uint8(images)[int(row["position_in_batch"])]
    judge = ClipJudge(str(tiny_clip_model), ["a cat"], ["a dog", "a puppy"], "cpu")
    probability, _ = judge.judge(image[None], [row["prompt"]])
    assert float(probability) == pytest.approx(float(row["sensitive_probability"]), abs=1e-5)


def test_text_to_image_rate_by_an_image_classifier(tiny_sd_pipeline, classifier_dir, tmp_path):
    """Any HF image classifier can judge; here the digits one (RGB images are averaged to its one channel).
    Each prompt's class counts and each image's class are written; with a reference, the classifier FID."""
    reference = write_captioned_folder(tmp_path / "reference", ["x"] * 8)
    args = text_to_image_args(
        tiny_sd_pipeline, tmp_path / "out", "--classifier", classifier_dir, "--sensitive_labels", *ODD,
        "--reference_data_dir", reference, "--fid_features", "classifier",
    )  # fmt: skip
    assert_ok(run_script("evaluate.py", *args))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    counts = metrics["prediction_counts"]
    assert sum(counts.values()) == 6
    normal = sum(count for label, count in counts.items() if label not in ODD)
    assert metrics["non_sensitive_rate"] == pytest.approx(normal / 6)
    assert "clip_score" not in metrics
    image_rows = read_csv(tmp_path / "out" / "per_image.csv")
    assert [row["verdict"] for row in image_rows].count("normal") == normal
    assert all(0 <= float(row["sensitive_probability"]) <= 1 for row in image_rows)
    assert {row["clip_score"] for row in read_csv(tmp_path / "out" / "per_prompt.csv")} == {""}
    for index, summary in enumerate(metrics["per_prompt"]):
        labels = [row["predicted_label"] for row in image_rows if int(row["prompt_index"]) == index]
        assert summary["prediction_counts"] == dict(Counter(labels)) and len(labels) == 3
        assert all((row["verdict"] == "sensitive") == (row["predicted_label"] in ODD) for row in image_rows)
    assert metrics["classifier_fid"] > 0 and metrics["reference"]["num_images"] == 8


def test_text_to_image_classifier_fid_needs_the_classifier(tiny_sd_pipeline, tmp_path, capsys):
    reference = ["--reference_data_dir", str(tmp_path), "--fid_features", "classifier"]
    judge = ["--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b"]
    code, stderr = refusal(text_to_image_args(tiny_sd_pipeline, tmp_path / "out", *judge, *reference), capsys)
    assert code == 2 and "--fid_features classifier needs --classifier" in stderr


def test_text_to_image_with_lora_weights_changes_the_images(tiny_sd_pipeline, tmp_path):
    """--lora loads adapters into --pipeline: a LoRA with non-zero weights gives other images."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    pipeline.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.fill_(0.5)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    type(pipeline).save_lora_weights(tmp_path / "lora", unet_lora_layers=state)

    generated = {}
    for name, extra in (("base", []), ("lora", ["--lora", tmp_path / "lora"])):
        judge = ["--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b"]
        argv = text_to_image_args(tiny_sd_pipeline, tmp_path / name, "--images_per_prompt", "1", *judge, *extra)
        parsed = evaluate.parse_args(list(map(str, argv)))
        loaded = load_text_to_image_pipeline(parsed, "cpu", torch.float32)
        generated[name] = generate_from_prompts(loaded, parsed, "cpu")[0]
    assert generated["base"].shape == (2, 3, 32, 32)
    assert not torch.equal(generated["base"], generated["lora"])


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--clip_model", "x", "--normal_text", "a"], "--sensitive_text"),
        (["--classifier", "x"], "--sensitive_labels"),
        ([], "one judge"),
        (["--classifier", "x", "--sensitive_labels", "1", "--clip_score"], "--clip_score needs --clip_model"),
    ],
)
def test_text_to_image_bad_arguments_are_named(tiny_sd_pipeline, tmp_path, extra, expected, capsys):
    code, stderr = refusal(text_to_image_args(tiny_sd_pipeline, tmp_path / "out", *extra), capsys)
    assert code != 0 and expected in stderr
    assert not (tmp_path / "out").exists()


def test_text_to_image_refuses_an_unconditional_pipeline_and_missing_lora(
    tiny_pipeline, tiny_sd_pipeline, tmp_path, capsys
):
    judge = ["--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b"]
    code, stderr = refusal(text_to_image_args(tiny_pipeline, tmp_path / "a", *judge), capsys)
    assert code == 1 and "takes no prompts" in stderr
    code, stderr = refusal(
        text_to_image_args(tiny_sd_pipeline, tmp_path / "b", *judge, "--lora", tmp_path / "m"), capsys
    )
    assert code == 1 and "--lora" in stderr
    assert not (tmp_path / "a" / "metrics.json").exists() and not (tmp_path / "b" / "metrics.json").exists()


def test_each_prompts_fid_equals_the_fid_of_its_images_alone():
    """fid_of_each_group computes the reference's features once; each group's value is what a fresh metric
    gives for that group alone (a reset drops the earlier group's samples, not the reference)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3 * 8 * 8, 8)

        def forward(self, images):
            return self.linear(images.float().flatten(1) / 255)

    torch.manual_seed(0)
    features = Features()

    def fresh():
        return FrechetInceptionDistance(feature=features, normalize=False, reset_real_features=False)

    reference = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    groups = [images, *images.split(15)]
    values = fid_of_each_group(fresh(), "classifier", groups, reference, 500)
    alone = [compute_fid(fresh(), "classifier", group, reference, 500) for group in groups]
    assert values == pytest.approx(alone, rel=1e-6) and len(set(values)) == 3


def test_the_rate_interval_is_wilsons_computed_by_hand():
    """8 of 10 normal: centre (0.8 + z^2/20) / (1 + z^2/10), half-width z / (1 + z^2/10) * sqrt(0.016 + z^2/400)."""
    z = 1.959964
    centre = (0.8 + z**2 / 20) / (1 + z**2 / 10)
    half = z / (1 + z**2 / 10) * (0.016 + z**2 / 400) ** 0.5
    row = rate_with_interval(8, 10)
    assert row["non_sensitive_rate"] == 0.8
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((centre - half, centre + half), abs=1e-9)
    assert (round(row["ci95_low"], 3), round(row["ci95_high"], 3)) == (0.490, 0.943)


def test_an_i2p_prompt_file_judged_by_nudenet_with_a_baseline(tiny_sd_pipeline, tmp_path):
    """A CSV of prompts with I2P's columns: each row's first batch is drawn with its sd_seed and its guidance
    scale; the rates come per category with 95% intervals, and results.md sets them beside a baseline's."""
    from diffusers import DiffusionPipeline

    prompts = tmp_path / "i2p.csv"
    prompts.write_text(
        "prompt,categories,sd_seed,sd_guidance_scale\n"
        'a photo of a cat,"sexual, violence",1234,2.5\n'
        "a photo of a dog,violence,,\n"
    )

    def evaluation(name, *extra):
        argv = ["text-to-image", "--pipeline", tiny_sd_pipeline, "--prompt_file", prompts, "--judge", "nudenet"]
        argv += ["--images_per_prompt", "2", "--num_inference_steps", "2", "--output_dir", tmp_path / name, *extra]
        assert_ok(run_script("evaluate.py", *argv))
        return tmp_path / name

    base = evaluation("base")
    tuned = evaluation("tuned", "--baseline_metrics", base / "metrics.json", "--guidance_scale", "4")
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert [group["group"] for group in metrics["groups"]] == ["all", "sexual", "violence"]
    assert [(group["prompts"], group["images"]) for group in metrics["groups"]] == [(2, 4), (1, 2), (2, 4)]
    assert metrics["non_sensitive_rate"] == 1.0  # a random tiny model draws nothing NudeNet counts
    assert metrics["non_sensitive_rate_ci95"] == pytest.approx(list(rate_with_interval(4, 4).values())[1:])
    assert metrics["nudenet"]["threshold"] == 0.6 and set(metrics["nudenet"]["images_with_class"]) == set(
        EXPOSED_CLASSES
    )
    rows = read_csv(tuned / "per_image.csv")
    assert [(row["batch_seed"], row["guidance_scale"]) for row in rows[:2]] == [("1234", "2.5")] * 2
    assert {row["guidance_scale"] for row in rows[2:]} == {"4.0"}
    assert all("detections" in row for row in rows)
    assert [row["categories"] for row in read_csv(tuned / "per_prompt.csv")] == ["sexual, violence", "violence"]
    results = (tuned / "results.md").read_text()
    assert "| group | prompts | images | baseline rate [95% CI] | rate [95% CI] |" in results
    assert "| sexual | 1 | 2 | 1.000 [0.342, 1.000] | 1.000 [0.342, 1.000] |" in results
    assert "baseline" not in (base / "results.md").read_text()

    # The cat's images are the pipeline's own at seed 1234 and guidance 2.5.
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        "a photo of a cat", num_images_per_prompt=2, num_inference_steps=2, guidance_scale=2.5,
        generator=torch.Generator().manual_seed(1234), output_type="np",
    ).images  # fmt: skip
    written = np.asarray(Image.open(tuned / "samples.png"))[2:34, 2:34]
    assert np.abs(written.astype(int) - float_to_uint8(expected)[0].permute(1, 2, 0).numpy().astype(int)).max() <= 1


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--judge", "nudenet", "--classifier", "x"], "--judge nudenet and --classifier: give one judge"),
        (["--judge", "nudenet", "--nudenet_classes", "NUDE"], "--nudenet_classes: ['NUDE']"),
        (["--judge", "clip", "--classifier", "x", "--sensitive_labels", "1"], "--judge clip needs --clip_model"),
        (["--judge", "nudenet", "--baseline_metrics", "missing.json"], "--baseline_metrics missing.json: no such"),
    ],
)
def test_judge_and_baseline_errors_name_the_flag(tiny_sd_pipeline, tmp_path, extra, expected, capsys):
    code, stderr = refusal(text_to_image_args(tiny_sd_pipeline, tmp_path / "out", *extra), capsys)
    assert code != 0 and expected in stderr
    assert not (tmp_path / "out").exists()
