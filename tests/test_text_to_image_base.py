"""prepare_text_to_image_base.py and its parts: a word tokenizer, and a whole Stable Diffusion pipeline trained
from nothing that the public Diffusers API loads, the same from the same seed; then the text-to-image benchmark
and benchmarks/loss_by_noise.py run on that base (in this file so that make test's workers, which take whole
files, make the base once; the benchmark's scores and goals are tested in test_text_to_image_protocol.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import paper_protocol  # benchmarks/, on pytest's pythonpath
import pytest
import text_to_image_protocol as protocol  # benchmarks/, on pytest's pythonpath
import torch

import prepare_text_to_image_base
from pu_diffusion.shapes import GENERIC_CAPTION, PARAPHRASES
from pu_diffusion.small_pipeline import write_word_tokenizer
from tests.helpers import REPO_ROOT, assert_ok, run_script, steps_in_this_process

#: prepare_text_to_image_base.py at a few steps on a few images.
TINY = ["--images_per_class", "6", "--vae_steps", "2", "--unet_steps", "2", "--batch_size", "4"]


@pytest.fixture(scope="module")
def tiny_text_to_image_base(tmp_path_factory) -> tuple[Path, Path]:
    """The text-to-image base script at a few steps: (its pipeline, its captioned shapes), the data where the
    text-to-image benchmark looks for it (DATA_ROOT/shapes32-captioned)."""
    root = tmp_path_factory.mktemp("text_to_image_base")
    data = root / "data" / "shapes32-captioned"
    argv = ["--output_dir", root / "base", "--data_dir", data, *TINY]
    # In this process: the script launches the UNet's training as a process of its own, as a user's run does.
    assert_ok(run_script("prepare_text_to_image_base.py", *argv))
    return root / "base", data


def test_a_user_sees_the_message_and_a_failing_exit_code(tmp_path):
    """The script as a user starts it, refused before anything loads (seconds): exit code 2, the message, no
    traceback, nothing written."""
    argv = ["--family", "sd3", "--snr_gamma", "5", "--output_dir", tmp_path / "base"]
    result = run_script("prepare_text_to_image_base.py", *argv, launcher="python", timeout=120)
    assert result.returncode == 2
    assert "error: --snr_gamma is DDPM's Min-SNR weighting" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "base").exists()


def test_the_word_tokenizer_gives_back_every_caption_and_spells_out_unseen_words(tmp_path):
    captions = ["a photo of a small dark blue star on stripes", GENERIC_CAPTION, "a photo of a ring"]
    tokenizer = write_word_tokenizer(tmp_path, captions)
    for caption in captions:
        ids = tokenizer(caption, padding="max_length").input_ids
        assert len(ids) == tokenizer.model_max_length
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    assert tokenizer.tokenize("star") == ["star</w>"]
    assert tokenizer.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]
    longest = max(len(tokenizer(caption).input_ids) for caption in captions)
    assert tokenizer.model_max_length == longest


def files_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        # The weights and the tokenizer's files; configs name the folder they were saved from.
        if path.suffix == ".safetensors" or path.name in ("vocab.json", "merges.txt", "tokenizer.json")
        if "checkpoint" not in str(path)
    }


def test_the_base_loads_as_a_stable_diffusion_pipeline_and_draws_at_32_px(tiny_text_to_image_base):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    base, _ = tiny_text_to_image_base
    pipeline = DiffusionPipeline.from_pretrained(base)
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert pipeline.vae.config.scaling_factor != 1.0  # set from the trained VAE's latents
    images = pipeline(
        GENERIC_CAPTION, num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=torch.manual_seed(0)
    ).images
    assert images.shape == (1, 32, 32, 3)
    for prompt in (GENERIC_CAPTION, *PARAPHRASES):
        assert pipeline.tokenizer.decode(pipeline.tokenizer(prompt).input_ids, skip_special_tokens=True) == prompt


@pytest.mark.slow
def test_the_sd3_base_loads_as_an_sd3_pipeline_trained_by_flow_matching(tmp_path):
    """--family sd3: two CLIPs with projection and a T5 as long as the longest caption, a centred VAE, an MMDiT
    transformer trained by this project's script with the flow-matching defaults."""
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    from transformers import T5EncoderModel

    import prepare_text_to_image_base as base_script

    argv = ["--family", "sd3", "--output_dir", tmp_path / "base", "--data_dir", tmp_path / "data", *TINY]
    args = base_script.parse_args([str(arg) for arg in argv])
    command = base_script.unet_training_command(args, tmp_path / "init")
    assert "--snr_gamma" not in command  # DDPM's weighting; SD3 keeps the flow-matching defaults
    result = run_script("prepare_text_to_image_base.py", *argv)
    assert_ok(result)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "base")
    assert isinstance(pipeline, StableDiffusion3Pipeline) and isinstance(pipeline.text_encoder_3, T5EncoderModel)
    assert pipeline.vae.config.shift_factor is not None and pipeline.scheduler.config.shift == 1.0
    # T5's tokenizer knows every word of the captions and the paraphrases, and is as long as the longest.
    captions = [*datasets_captions(tmp_path / "data"), *PARAPHRASES]
    ids = [pipeline.tokenizer_3(caption).input_ids for caption in captions]
    assert all(pipeline.tokenizer_3.unk_token_id not in row for row in ids)
    assert [pipeline.tokenizer_3.decode(row, skip_special_tokens=True) for row in ids] == captions
    length = pipeline.tokenizer_3.model_max_length
    assert length == max(map(len, ids)) < 30
    assert f"sampled with max_sequence_length={length}" in result.stdout
    initial = DiffusionPipeline.from_pretrained(tmp_path / "base-init")
    trained, untrained = pipeline.transformer.state_dict(), initial.transformer.state_dict()
    assert any(not torch.equal(trained[key], untrained[key]) for key in trained)
    images = pipeline(
        GENERIC_CAPTION, num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=torch.manual_seed(0),
        max_sequence_length=length,
    ).images  # fmt: skip
    assert images.shape == (1, 32, 32, 3)


def datasets_captions(folder: Path) -> list[str]:
    import datasets

    return datasets.load_dataset(str(folder), split="train")["text"]


@pytest.mark.slow
def test_the_base_is_the_same_from_the_same_seed_and_another_from_another(tiny_text_to_image_base, tmp_path):
    base, data = tiny_text_to_image_base
    again = tmp_path / "again"
    assert_ok(run_script("prepare_text_to_image_base.py", "--output_dir", again, "--data_dir", data, *TINY))
    trained = files_digest(base)
    assert trained == files_digest(again) and "unet/diffusion_pytorch_model.safetensors" in trained
    assert any(name.startswith("tokenizer/") for name in trained)  # the saved tokenizer is compared too
    initial = prepare_text_to_image_base.parse_args(
        ["--output_dir", str(tmp_path / "other"), "--data_dir", str(data), *TINY, "--seed", "1"]
    )
    other = files_digest(prepare_text_to_image_base.build_initial_pipeline(initial))
    first = files_digest(base.with_name(base.name + "-init"))
    assert other["vae/diffusion_pytorch_model.safetensors"] != first["vae/diffusion_pytorch_model.safetensors"]


def test_a_finished_base_is_kept(tiny_text_to_image_base):
    base, data = tiny_text_to_image_base
    before = files_digest(base)
    result = run_script("prepare_text_to_image_base.py", "--output_dir", base, "--data_dir", data, *TINY)
    assert_ok(result)
    assert "kept" in result.stdout and files_digest(base) == before
    assert (REPO_ROOT / "prepare_text_to_image_base.py").is_file()


def test_the_unet_is_trained_by_the_text_to_image_script_with_min_snr_and_caption_dropout(tmp_path):
    """The base's UNet training is a run of train_pu_text_to_image.py: unsupervised, Min-SNR 5 and a tenth of the
    captions dropped by default; --train_args come last, so they override."""
    args = prepare_text_to_image_base.parse_args(
        ["--output_dir", str(tmp_path / "base"), "--train_args", "--snr_gamma", "1.5"]
    )
    command = prepare_text_to_image_base.unet_training_command(args, tmp_path / "base-init")
    assert command[1].endswith("train_pu_text_to_image.py")

    def value_of(flag: str) -> str:  # its first occurrence
        return command[command.index(flag) + 1]

    assert value_of("--loss_type") == "unsupervised" and value_of("--caption_dropout_rate") == "0.1"
    assert value_of("--snr_gamma") == "5.0" and command[-2:] == ["--snr_gamma", "1.5"]


@pytest.mark.slow
def test_the_text_to_image_benchmark_trains_scores_reports_and_reuses(
    tiny_text_to_image_base, tmp_path, capsys, monkeypatch
):
    """One method, one mode, one seed: the base row, one LoRA run, the report. The benchmark and its training
    and evaluation steps run in this process."""
    steps_in_this_process(monkeypatch, paper_protocol)
    steps_in_this_process(monkeypatch, protocol)
    base, data = tiny_text_to_image_base
    output_dir = tmp_path / "benchmark"
    argv = ["--methods", "pu", "--modes", "lora", "--seeds", "0"]
    argv += ["--base_dir", base, "--data_root", data.parent, "--output_dir", output_dir]
    argv += ["--max_train_steps", "2", "--images_per_prompt", "2", "--classifier_epochs", "1"]
    argv += ["--allow_weak_classifier"]  # a classifier of 36 images, trained for one epoch
    argv = [str(arg) for arg in argv]
    protocol.main(argv)
    report = (output_dir / "results.md").read_text()
    assert report in capsys.readouterr().out
    for row in ("base", "lora-pu"):
        assert f"| {row} | 1 |" in report
    results = json.loads((output_dir / "results.json").read_text())
    run = output_dir / "runs" / "lora-pu-seed0"
    metrics = json.loads((run / "evaluation" / "metrics.json").read_text())
    generic = metrics["per_prompt"][0]
    assert generic["prompt"] == "a photo of a shape"
    assert results["summary"]["lora-pu"]["non_sensitive_rate"] == [generic["non_sensitive_rate"]]
    assert results["summary"]["lora-pu"]["classifier_fid"] == [generic["classifier_fid"]]
    assert metrics["num_images"] == 2 * 7  # the generic prompt, 3 paraphrases, 3 normal prompts
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    training = json.loads((run / "benchmark_run.json").read_text())["command"]
    assert "--use_lora" in training and "--paper_loss" not in training and "--prior" not in training
    assert training[training.index("--caption_dropout_rate") + 1] == "0.1"  # every method alike, as the base
    evaluation = json.loads((run / "benchmark_evaluation.json").read_text())["command"]
    assert evaluation[evaluation.index("--guidance_scale") + 1] == str(protocol.GUIDANCE_SCALE)
    assert (output_dir / "chart.png").is_file() and (output_dir / "grids.png").is_file()

    trained_at = (run / "train.log").stat().st_mtime
    protocol.main(argv)
    assert (run / "train.log").stat().st_mtime == trained_at  # reused, not trained again
    assert (output_dir / "results.md").read_text() == report


def test_loss_by_noise_reads_the_text_to_image_models_in_latent_space_under_the_generic_caption(
    tiny_text_to_image_base, monkeypatch
):
    import loss_by_noise
    import torch

    base, data = tiny_text_to_image_base
    monkeypatch.setattr(
        loss_by_noise,
        "SPLIT_COUNTS",
        {"num_unlabeled_normal": 2, "num_unlabeled_sensitive": 1, "num_labeled_sensitive": 1},
    )
    argv = ["--text_to_image", "--base_dir", str(base), "--data_dir", str(data), "--draws", "1", f"base={base}"]
    lines = loss_by_noise.main(argv)
    rows = [line.split(" | ") for line in lines[2:]]
    # The tiny base's shapes: 5 train and 1 test image per shape, three shapes normal and three sensitive.
    groups = ["U normal (2)", "U sensitive (1)", "S (1)", "test normal (3)", "test sensitive (3)"]
    assert [row[1] for row in rows] == groups
    assert all(float(cell.strip(" |")) > 0 for row in rows for cell in row[2:])

    images = loss_by_noise.label_groups(str(data), 0, protocol.SENSITIVE_SHAPES, "RGB", {})["test normal"]
    unet, scheduler, latents, caption = loss_by_noise.text_to_image_model(str(base), None, {"x": images})
    assert latents["x"].shape == (3, 4, 8, 8)  # 32 px through the VAE's 4x downsampling
    conditioned = loss_by_noise.mean_loss(unet, scheduler, latents["x"], (0, 1000), 1, 0, caption)
    other = loss_by_noise.mean_loss(unet, scheduler, latents["x"], (0, 1000), 1, 0, torch.zeros_like(caption))
    assert conditioned != other  # the caption reaches the UNet


def test_loss_by_noise_reads_an_sd3_model_by_sigma_with_the_error_its_training_takes(
    tiny_text_to_image_base, tiny_sd3_pipeline, monkeypatch
):
    from types import SimpleNamespace

    import loss_by_noise
    from diffusers import AutoencoderKL

    _, data = tiny_text_to_image_base
    monkeypatch.setattr(
        loss_by_noise,
        "SPLIT_COUNTS",
        {"num_unlabeled_normal": 2, "num_unlabeled_sensitive": 1, "num_labeled_sensitive": 1},
    )
    base = str(tiny_sd3_pipeline)
    argv = ["--text_to_image", "--base_dir", base, "--data_dir", str(data), "--draws", "1", f"sd3={base}"]
    lines = loss_by_noise.main(argv)
    bands = "sigma in [0, 0.254) | sigma in [0.254, 0.5) | sigma in [0.5, 0.75) | sigma in [0.75, 1)"
    assert lines[:2] == [f"| model | group | {bands} |", "| --- | --- | --- | --- | --- | --- |"]
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[1] for row in rows] == [
        "U normal (2)",
        "U sensitive (1)",
        "S (1)",
        "test normal (3)",
        "test sensitive (3)",
    ]
    assert all(float(cell.strip(" |")) > 0 for row in rows for cell in row[2:])

    # By hand: a transformer that predicts no velocity leaves x_sigma as its estimate of x_0, so at sigma = 0.5
    # l = ||x_0 - (0.5 x_0 + 0.5 noise)||^2 = 0.25 ||noise - x_0||^2, with the draws' noise.
    def still(hidden_states, **_):
        return SimpleNamespace(sample=torch.zeros_like(hidden_states))

    latents, caption = torch.randn(3, 4, 8, 8), (torch.zeros(1, 5, 16), torch.zeros(1, 8))
    generator = torch.Generator().manual_seed(7)
    by_hand = []
    for _ in range(2):
        noise = torch.randn(latents.shape, generator=generator)
        torch.rand(3, generator=generator)  # the sigmas' draw, all 0.5 in a band of width 0
        by_hand.append(0.25 * ((noise - latents) ** 2).sum(dim=(1, 2, 3)))
    value = loss_by_noise.mean_flow_loss(still, latents, (0.5, 0.5), 2, 7, caption)
    assert value == pytest.approx(torch.cat(by_hand).mean().item(), rel=1e-6)

    images = loss_by_noise.label_groups(str(data), 0, protocol.SENSITIVE_SHAPES, "RGB", {})["test normal"]
    transformer, inputs, caption = loss_by_noise.sd3_model(base, None, {"x": images})
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    with torch.no_grad():
        expected = (vae.encode(images).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(inputs["x"], expected)  # centred by the VAE's shift, then scaled, as trained
    conditioned = loss_by_noise.mean_flow_loss(transformer, inputs["x"], (0.5, 1.0), 1, 0, caption)
    blank = tuple(torch.zeros_like(tensor) for tensor in caption)
    assert conditioned != loss_by_noise.mean_flow_loss(transformer, inputs["x"], (0.5, 1.0), 1, 0, blank)
