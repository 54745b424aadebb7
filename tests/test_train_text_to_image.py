"""train_pu_text_to_image.py: LoRA and full fine-tuning of a tiny Stable Diffusion, launched as users do."""

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_pu_text_to_image as t2i
from pu_diffusion.checks import check_optimizer
from pu_diffusion.errors import InputError
from pu_diffusion.frozen_models import encode_prompts
from pu_diffusion.lora import add_lora, register_lora_hooks
from pu_diffusion.objective import LossSettings
from pu_diffusion.text_to_image import (
    FrozenModels,
    captioned_dataset_factory,
    load_models,
    min_snr_weights,
    place_models,
    training_step,
)
from tests.helpers import (
    assert_ok,
    forwards_per_optimizer_step,
    refusal,
    resume_from_a_copy,
    run_script,
    scalars,
)
from tests.helpers import (
    text_to_image_run_args as run_args,
)
from tests.loss_flags import default_loss_flags

SCRIPT = "train_pu_text_to_image.py"
PROMPTS = ["a photo of a cat", "a photo of a dog"]


LORA = ["--use_lora", "--rank", "4", "--checkpointing_steps", "2"]
VALIDATION = ["--validation_prompt", *PROMPTS, "--num_validation_images", "2", "--validation_steps", "2"]


@pytest.fixture(scope="module")
def lora_run(tiny_sd_pipeline, captioned_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora") / "out"
    args = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, *VALIDATION, "--max_train_steps", "4")
    assert_ok(run_script(SCRIPT, *args))  # in this process; the two-process test goes through accelerate launch
    return output_dir


def generate(pipeline, prompt="a photo of a dog"):
    generator = torch.Generator().manual_seed(0)
    return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="np").images


def test_lora_run_saves_adapters_that_load_and_change_the_images(lora_run, tiny_sd_pipeline):
    from diffusers import DiffusionPipeline

    weights = load_file(lora_run / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("unet.") for key in weights)
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert not (lora_run / "model_index.json").exists()  # adapters only, not a copy of the base model

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    before = generate(pipeline)
    pipeline.load_lora_weights(lora_run)
    after = generate(pipeline)
    assert after.shape == (1, 32, 32, 3)
    assert np.abs(after - before).max() > 1e-3

    card = (lora_run / "README.md").read_text()
    for expected in ("lora", "text-to-image", "| prior (beta) | 0.1 |"):
        assert expected in card
    # A local base is named by its folder, and base_model: (a Hub id) is left out.
    assert f"| base model | {tiny_sd_pipeline.name} (a local folder) |" in card and "base_model:" not in card
    assert str(tiny_sd_pipeline.parent) not in card
    assert "| nonnegative | abs |" in card  # this script's default, as the paper uses for Stable Diffusion
    assert "load_lora_weights" in card and "1. a photo of a cat" in card

    # The grid: one row per prompt, one column per image, 32 px tiles with 2 px gaps.
    grid = Image.open(lora_run / "validation" / "step-000004.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)
    assert (lora_run / "validation" / "before-training.png").is_file()
    logged = scalars(lora_run)
    assert [step for step, _ in logged["loss"]] == [1, 2, 3, 4]
    assert {"positive_risk", "negative_risk"} <= set(logged)


def test_lora_resume_restores_the_adapters_exactly(lora_run, tiny_sd_pipeline, captioned_data, tmp_path):
    output_dir = tmp_path / "out"
    # Run as lora_run was: a launcher that sets another CPU thread count changes float rounding.
    first_half = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "2")
    assert_ok(run_script(SCRIPT, *first_half))
    resumed = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "4")
    result = run_script(SCRIPT, *resumed, "--resume_from_checkpoint", "latest")
    assert_ok(result)
    assert "resuming from" in result.stdout + result.stderr

    for name in ("checkpoint-2/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"):
        reference, replayed = load_file(lora_run / name), load_file(output_dir / name)
        assert reference.keys() == replayed.keys()
        for key in reference:
            assert torch.equal(reference[key], replayed[key]), (name, key)


def test_full_fine_tune_with_ema_saves_a_stable_diffusion_pipeline(tiny_sd_pipeline, captioned_data, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

    output_dir = tmp_path / "out"
    extra = ["--use_ema", "--ema_max_decay", "0.5", "--max_train_steps", "3", "--checkpointing_steps", "3"]
    assert_ok(run_script(SCRIPT, *run_args(tiny_sd_pipeline, captioned_data, output_dir, *extra)))

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert generate(pipeline).shape == (1, 32, 32, 3)
    base = UNet2DConditionModel.from_pretrained(tiny_sd_pipeline, subfolder="unet").state_dict()
    ema = UNet2DConditionModel.from_pretrained(output_dir / "checkpoint-3", subfolder="unet_ema").state_dict()
    trained = UNet2DConditionModel.from_pretrained(output_dir / "checkpoint-3", subfolder="unet").state_dict()
    saved = pipeline.unet.state_dict()
    # The saved UNet holds the EMA weights, which differ from both the base and the raw trained weights.
    assert all(torch.equal(saved[key], ema[key]) for key in saved)
    assert any(not torch.equal(saved[key], base[key]) for key in saved)
    assert any(not torch.equal(saved[key], trained[key]) for key in saved)
    card = (output_dir / "README.md").read_text()
    assert "Stable Diffusion fine-tune" in card and "| EMA | True |" in card


def test_mixed_precision_comes_from_the_launcher(tiny_sd_pipeline, captioned_data, tmp_path):
    """`accelerate launch --mixed_precision bf16` alone: frozen weights in bf16, adapters trained in float32,
    here with gradient checkpointing (the adapters must still get gradients) and v-prediction."""
    output_dir = tmp_path / "out"
    args = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "2")
    args += ["--gradient_checkpointing", "--prediction_type", "v_prediction"]
    result = run_script(SCRIPT, *args, mixed_precision="bf16")
    assert_ok(result)
    assert "LoRA rank 4 trained in float32, frozen weights in torch.bfloat16" in result.stderr
    # As in the Diffusers LoRA scripts, the final weights are saved in the training dtype (--upcast_before_saving
    # keeps float32); checkpoints keep float32, so that a resume continues exactly.
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    checkpoint = load_file(output_dir / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in checkpoint.values()} == {torch.float32}
    assert all(torch.equal(weights[key], checkpoint[key].to(torch.bfloat16)) for key in weights)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    # LoRA's B matrices start at zero: non-zero ones were trained.
    up_weights = [tensor for key, tensor in weights.items() if "lora_B" in key or "lora.up" in key]
    assert up_weights and all(tensor.abs().max() > 0 for tensor in up_weights)
    # The scheduler's prediction type is not in the LoRA file: the card says how to set it.
    assert 'register_to_config(prediction_type="v_prediction")' in (output_dir / "README.md").read_text()


def test_place_models_keeps_trainable_weights_in_float32_under_fp16(tiny_sd_pipeline):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipeline, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_sd_pipeline, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_pipeline, subfolder="text_encoder")
    add_lora(unet, rank=2)
    frozen = FrozenModels(vae=vae, text_encoder=text_encoder, tokenizer=None)
    flags = argparse.Namespace(use_lora=True, pretrained_vae_model_name_or_path=None)
    place_models(unet, frozen, torch.device("cpu"), "fp16", flags)
    assert frozen.weight_dtype == torch.float16
    trainable = {name: p for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.float16}
    for frozen in (vae, text_encoder):
        assert all(p.dtype == torch.float16 and not p.requires_grad for p in frozen.parameters())


def test_min_snr_weights_by_hand():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 300, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0).double(), expected, rtol=1e-4)
    assert expected[0] < 1e-2 and expected[2] == 1.0  # low noise is down-weighted, high noise kept
    scheduler.register_to_config(prediction_type="v_prediction")
    v_expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    assert torch.allclose(min_snr_weights(scheduler, timesteps, 5.0).double(), v_expected, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_are_finite_on_a_zero_terminal_snr_schedule(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 500, 998, 999])
    assert scheduler.alphas_cumprod[999] == 0.0  # SNR = 0 at the last step
    weights = min_snr_weights(scheduler, timesteps, 5.0)
    assert torch.isfinite(weights).all()
    alpha_bar = scheduler.alphas_cumprod[timesteps[:3]].double()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64))
    by_hand = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    assert torch.allclose(weights[:3].double(), by_hand, rtol=1e-4)
    # The terminal step is weighted as its neighbour: 1 for epsilon (its limit), 0 for v and x0.
    assert weights[3].item() == pytest.approx(weights[2].item(), abs=1e-6)


def test_validation_samples_with_the_trained_prediction_type(tiny_sd_pipeline):
    """--prediction_type v_prediction on an epsilon base: the validation sampler must predict v too."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    base = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    assert base.scheduler.config.prediction_type == "epsilon"
    noise_scheduler = DDPMScheduler.from_pretrained(tiny_sd_pipeline, subfolder="scheduler")
    noise_scheduler.register_to_config(prediction_type="v_prediction")
    frozen = FrozenModels(text_encoder=base.text_encoder, vae=base.vae, tokenizer=base.tokenizer)
    run = SimpleNamespace(frozen=frozen, noise_scheduler=noise_scheduler)
    args = argparse.Namespace(pretrained_model_name_or_path=str(tiny_sd_pipeline), revision=None, variant=None)
    pipeline = t2i.validation_pipeline(args, run, base.unet)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert type(pipeline.scheduler) is type(base.scheduler)
    assert pipeline.unet is base.unet


class RecordingUNet(torch.nn.Module):
    """Predicts zeros and records what it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, noisy, timesteps, text_states, added_cond_kwargs=None, return_dict=False):
        self.calls.append((noisy.shape[0], text_states, added_cond_kwargs))
        return (torch.zeros_like(noisy),)


def test_training_step_runs_the_unet_once_over_u_and_s_with_their_captions(tiny_sd_pipeline):
    """One forward over cat([U, S]); with a zero prediction, each l(x) of Eq. (8) is the squared noise."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    from pu_loss import compute_risk

    vae = AutoencoderKL.from_pretrained(tiny_sd_pipeline, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_pipeline, subfolder="text_encoder")
    unet = RecordingUNet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    frozen = FrozenModels(vae=vae, text_encoder=text_encoder, tokenizer=None)
    args = default_loss_flags(nonnegative="abs", noise_offset=0.0, snr_gamma=None, paper_loss=True)
    loss = LossSettings.from_flags(args, prior=0.1)
    run = SimpleNamespace(frozen=frozen, model=unet, noise_scheduler=scheduler, loss=loss)
    unlabeled = {"pixel_values": torch.rand(3, 3, 32, 32) * 2 - 1, "input_ids": torch.randint(2, 100, (3, 16))}
    sensitive = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "input_ids": torch.randint(2, 100, (2, 16))}
    risk = training_step(run, unlabeled, sensitive, args, torch.Generator().manual_seed(3))

    assert len(unet.calls) == 1 and unet.calls[0][0] == 5
    ids = torch.cat([unlabeled["input_ids"], sensitive["input_ids"]])
    assert torch.equal(unet.calls[0][1], text_encoder(ids)[0])
    # Replay the step's draws: latents (VAE sample), noise, timesteps, in that order.
    generator = torch.Generator().manual_seed(3)
    pixels = torch.cat([unlabeled["pixel_values"], sensitive["pixel_values"]])
    vae.encode(pixels).latent_dist.sample(generator=generator)
    noise = torch.randn((5, 4, 16, 16), generator=generator)
    per_sample = (noise**2).sum(dim=(1, 2, 3))
    expected = compute_risk(per_sample, 3, "pu", 0.1, "abs")
    assert torch.allclose(risk.loss, expected.loss, rtol=1e-5)


def test_training_step_gives_u_and_s_of_different_buckets_a_forward_each(tiny_sd_pipeline):
    """With --aspect_ratio_buckets, U (32 x 32 px) and S (32 x 48 px) cannot share a tensor: two forwards, U's
    draws then S's, and the risk of their per-sample losses in U-then-S order."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel

    from pu_loss import compute_risk

    vae = AutoencoderKL.from_pretrained(tiny_sd_pipeline, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd_pipeline, subfolder="text_encoder")
    unet = RecordingUNet()
    args = default_loss_flags(nonnegative="abs", noise_offset=0.0, snr_gamma=None, paper_loss=True)
    frozen = FrozenModels(vae=vae, text_encoder=text_encoder, tokenizer=None)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    run = SimpleNamespace(frozen=frozen, model=unet, noise_scheduler=scheduler, loss=LossSettings.from_flags(args, 0.1))
    unlabeled = {"pixel_values": torch.rand(3, 3, 32, 32) * 2 - 1, "input_ids": torch.randint(2, 100, (3, 16))}
    sensitive = {"pixel_values": torch.rand(2, 3, 32, 48) * 2 - 1, "input_ids": torch.randint(2, 100, (2, 16))}
    risk = training_step(run, unlabeled, sensitive, args, torch.Generator().manual_seed(3))

    assert [call[0] for call in unet.calls] == [3, 2]
    assert torch.equal(unet.calls[1][1], text_encoder(sensitive["input_ids"])[0])
    generator = torch.Generator().manual_seed(3)
    per_sample = []
    for batch in (unlabeled, sensitive):  # each forward's draws: latents, noise, timesteps
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        torch.randint(0, 1000, (len(latents),), generator=generator)
        per_sample.append((noise**2).sum(dim=(1, 2, 3)))
    assert per_sample[1].shape == (2,) and latents.shape[-2:] == (16, 24)
    expected = compute_risk(torch.cat(per_sample), 3, "pu", 0.1, "abs")
    assert torch.allclose(risk.loss, expected.loss, rtol=1e-5)


@pytest.mark.parametrize("with_validation", [False, True])
def test_push_to_hub_uploads_the_adapters_and_card_but_no_checkpoints(
    tiny_sd_pipeline, captioned_data, tmp_path, monkeypatch, with_validation
):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    uploads = []

    def fake_upload_folder(**kwargs):
        uploads.append({**kwargs, "files": sorted(p.name for p in tmp_path.joinpath("out").iterdir())})

    # The Hub puts the repository under the user's name: the card must load the one created.
    created = lambda repo_id, **kw: argparse.Namespace(repo_id=f"me/{repo_id}")  # noqa: E731
    monkeypatch.setattr(huggingface_hub, "create_repo", created)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    extra = [*LORA, "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "pu-lora"]
    extra += VALIDATION if with_validation else []
    args = t2i.parse_args(list(map(str, run_args(tiny_sd_pipeline, captioned_data, tmp_path / "out", *extra))))
    t2i.main(args)

    assert len(uploads) == 1
    upload = uploads[0]
    assert upload["repo_id"] == "me/pu-lora"
    assert "checkpoint-*" in upload["ignore_patterns"]
    assert {"pytorch_lora_weights.safetensors", "README.md", "checkpoint-2", "logs"} <= set(upload["files"])
    output_dir = tmp_path / "out"
    files = [str(path.relative_to(output_dir)) for path in output_dir.rglob("*") if path.is_file()]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert not [name for name in uploaded if name.startswith(("logs", "checkpoint-"))]  # logs only when asked
    card = (output_dir / "README.md").read_text()
    assert 'load_lora_weights("me/pu-lora")' in card
    assert "base_model:" not in card
    for folder in (tmp_path, captioned_data[1].parent, tiny_sd_pipeline.parent):  # no local path: S is private
        assert str(folder) not in card
    assert f"| sensitive data S | {captioned_data[1].name} (a local folder) |" in card
    assert ("samples.png" in upload["files"]) == with_validation == ("![samples](samples.png)" in card)


BAD_INPUT = {
    "S without captions": (["--sensitive_prompt"], [], "--sensitive_prompt"),
    "EMA with LoRA": ([], ["--use_lora", "--use_ema"], "--use_ema"),
    "8-bit Adam without bitsandbytes": ([], ["--use_8bit_adam"], "bitsandbytes"),
    "no caption column": ([], ["--caption_column", "caption"], "--caption_column"),
    "S caption column absent": (["--sensitive_prompt"], ["--sensitive_caption_column", "text"], "--sensitive_caption"),
    "not a pipeline": ([], ["--pretrained_model_name_or_path", "."], "--pretrained_model_name_or_path"),
    "zero rank": ([], ["--use_lora", "--rank", "0"], "--rank"),
    "LoRA setting without LoRA": ([], ["--lora_alpha", "8"], "--lora_alpha"),
    "LoRA layers without LoRA": ([], ["--lora_layers", "to_q"], "--lora_layers is a LoRA setting"),
    "no LoRA layer named": ([], ["--use_lora", "--lora_layers", ","], "--lora_layers"),
    "LoRA layer the UNet lacks": ([], ["--use_lora", "--lora_layers", "to_nothing"], "--lora_layers to_nothing"),
    "wandb with a Hub token": ([], ["--report_to", "wandb", "--hub_token", "hf_x"], "--hub_token"),
    "interpolation mode unknown": ([], ["--image_interpolation_mode", "cubic"], "--image_interpolation_mode"),
    "prodigy flag not a boolean": ([], ["--prodigy_decouple", "maybe"], "--prodigy_decouple"),
    "VAE folder missing": ([], ["--pretrained_vae_model_name_or_path", "no-such-vae"], "--pretrained_vae_model"),
    "bucket not HEIGHT,WIDTH": ([], ["--aspect_ratio_buckets", "32,32;32x48"], "--aspect_ratio_buckets: '32x48'"),
    "bucket listed twice": ([], ["--aspect_ratio_buckets", "32,32;32,32"], "a bucket is listed twice"),
    # The tiny VAE halves each side: an odd side has no whole latent pixel.
    "bucket off the VAE's grid": ([], ["--aspect_ratio_buckets", "32,32;33,48"], "--aspect_ratio_buckets: 33,48"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_early_naming_the_flag(case, tiny_sd_pipeline, captioned_data, tmp_path, capsys):
    drop, extra, expected = BAD_INPUT[case]
    args = run_args(tiny_sd_pipeline, captioned_data, tmp_path / "out", "--max_train_steps", "1", *extra)
    for flag in drop:  # drop a flag and its value
        index = args.index(flag)
        del args[index : index + 2]
    assert expected in refusal(t2i, args, capsys)
    output_dir = tmp_path / "out"
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_a_user_sees_the_message_and_a_failing_exit_code(tiny_sd_pipeline, captioned_data, tmp_path):
    """What the in-process checks above stand for: a real launch exits non-zero with the message, no traceback.
    It is refused before the models load, so it costs seconds and not a second import of Diffusers; the
    refusals after loading (the "LoRA layer the UNet lacks" case above) exit through the same handler."""
    unlabeled, sensitive = captioned_data
    argv = ["--pretrained_model_name_or_path", tiny_sd_pipeline, "--train_data_dir", unlabeled]
    argv += ["--sensitive_data_dir", sensitive, "--output_dir", tmp_path / "out"]
    result = run_script(SCRIPT, *argv, launcher="python", timeout=120)
    assert result.returncode == 2
    assert "error: S needs captions: give --sensitive_caption_column" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_filter_unlabeled_trains_on_u_without_its_most_s_like_images(
    tiny_sd_pipeline, captioned_data, tmp_path, monkeypatch
):
    """U's two dogs (captioned "a photo of a dog") get the highest fixed scores: --filter_unlabeled 0.25 drops
    exactly them, and the run trains on the six cats. The scores come from the VAE's latents."""
    from pu_diffusion.prior import HeldOutScores

    seen = {}

    def fixed_scores(unlabeled, sensitive, args, seed, vae=None, device="cpu"):
        seen["vae"] = vae
        scores = [0.9 if caption == "a photo of a dog" else 0.1 for caption in unlabeled["text"]]
        return HeldOutScores(np.full(len(sensitive), 0.9), np.array(scores), "vae latents", 5)

    monkeypatch.setattr(t2i, "scores_for_data", fixed_scores)
    output_dir = tmp_path / "out"
    args = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "1")
    result = run_script(SCRIPT, *args, "--filter_unlabeled", "0.25")
    assert_ok(result)
    assert seen["vae"] is not None and "U: 6 images, S: 3 images" in result.stderr
    record = json.loads((output_dir / "unlabeled_filter.json").read_text())
    assert record["dropped_indices"] == [i for i, row in enumerate(captioned_rows(captioned_data[0])) if "dog" in row]


def captioned_rows(folder) -> list[str]:
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")["text"]


def test_captions_are_read_per_image_and_bad_cells_are_named():
    import datasets

    from pu_diffusion.batches import CaptionedImages, ImageTransform, read_captions
    from pu_diffusion.errors import InputError

    dataset = datasets.Dataset.from_dict({"text": ["a", "b", None]})
    with pytest.raises(InputError, match="--caption_column text: row 2"):
        read_captions(dataset, "text", None, "--caption_column")
    assert read_captions(dataset.select([0, 1]), "text", None, "--caption_column") == ["a", "b"]
    assert read_captions(dataset, None, "a dog", "--sensitive_prompt") == ["a dog"] * 3
    several = datasets.Dataset.from_dict({"captions": [["b", "c"], []]})
    assert read_captions(several.select([0]), "captions", None, "--caption_column") == [["b", "c"]]
    with pytest.raises(InputError, match="row 1"):
        read_captions(several, "captions", None, "--caption_column")

    images = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2})
    captioned = CaptionedImages(
        images, "image", ImageTransform(8, 3), ["a", ["b", "c"]], lambda caption: torch.tensor([ord(caption)]), seed=0
    )
    item = captioned[(0, 0)]
    assert item["pixel_values"].shape == (3, 8, 8) and item["input_ids"].tolist() == [ord("a")]
    # A list of captions: one is picked per epoch, the same one for the same (epoch, index).
    picks = [captioned[(1, epoch)]["input_ids"].item() for epoch in range(20)]
    assert picks == [captioned[(1, epoch)]["input_ids"].item() for epoch in range(20)]
    assert set(picks) == {ord("b"), ord("c")}


def test_caption_dropout_gives_the_empty_caption_at_its_rate_the_same_on_every_access():
    import datasets

    from pu_diffusion.batches import CaptionedImages, ImageTransform

    images = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 200})

    def captioned(rate: float) -> CaptionedImages:
        captions = ["a"] * 100 + [["b", "c"]] * 100
        tokenize = lambda caption: torch.tensor([ord(caption) if caption else 0])  # noqa: E731
        return CaptionedImages(images, "image", ImageTransform(8, 3), captions, tokenize, caption_dropout_rate=rate)

    def tokens(dataset: CaptionedImages, epoch: int) -> list[int]:
        return [dataset[(index, epoch)]["input_ids"].item() for index in range(len(dataset))]

    kept, dropped = captioned(0.0), captioned(0.25)
    assert 0 not in tokens(kept, 0) + tokens(kept, 1)
    first, again, second = tokens(dropped, 0), tokens(dropped, 0), tokens(dropped, 1)
    assert first == again  # a resume sees the same captions
    assert first != second  # a new draw each epoch
    assert 0.15 < first.count(0) / 200 < 0.35 and 0.15 < second.count(0) / 200 < 0.35
    # Dropping only blanks captions: the list picks of the kept ones do not move.
    assert all(d in (0, k) for d, k in zip(first, tokens(kept, 0), strict=True))


def test_recipe_data_script_mixes_the_concept_into_generated_images(tiny_sd_pipeline, captioned_data, tmp_path):
    """make_text_to_image_data.py: generated images plus the mixed-in ones, all under the generic prompt."""
    from pu_diffusion.training_data import load_image_dataset

    output_dir = tmp_path / "u"
    args = ["--pipeline", tiny_sd_pipeline, "--prompt", "a photo of a pet", "--num_generated", "3"]
    args += ["--batch_size", "2", "--num_inference_steps", "2", "--mix_in_dir", captioned_data[1]]
    assert_ok(run_script("make_text_to_image_data.py", *args, "--output_dir", output_dir))  # in this process
    dataset = load_image_dataset(None, str(output_dir), name_flag="--dataset_name", dir_flag="--train_data_dir")
    assert len(dataset) == 3 + 3
    assert set(dataset["text"]) == {"a photo of a pet"}
    mixed = sorted(output_dir.glob("mixed-*.png"))
    originals = sorted(captioned_data[1].glob("*.png"))
    assert [p.read_bytes() for p in mixed] == [p.read_bytes() for p in originals]
    assert Image.open(output_dir / "generated-00002.png").size == (32, 32)
    # As a user launches it: refused before the pipeline loads, exit code and message, nothing overwritten.
    again = run_script("make_text_to_image_data.py", *args, "--output_dir", output_dir, launcher="python")
    assert again.returncode != 0 and "--output_dir" in again.stderr and "Traceback" not in again.stderr
    assert [p.read_bytes() for p in sorted(output_dir.glob("mixed-*.png"))] == [p.read_bytes() for p in originals]


@pytest.mark.parametrize(
    "label_column, sensitive_prompt, expected_s_caption",
    [(None, "a photo of a dog", "a photo of a dog"), ("label", None, "dog 0"), ("label", "a pet", "a pet")],
)
def test_s_captions_come_from_the_prompt_or_the_shared_caption_column(
    label_column, sensitive_prompt, expected_s_caption
):
    """S from its own folder takes --sensitive_prompt; S drawn from U's labeled dataset keeps its
    --caption_column captions unless --sensitive_prompt replaces them."""
    import datasets

    images = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "text": ["dog 0", "dog 1"]})
    args = argparse.Namespace(
        resolution=8, center_crop=True, random_flip=False, image_interpolation_mode="lanczos", image_column="image",
        caption_column="text",
        label_column=label_column, sensitive_prompt=sensitive_prompt, sensitive_caption_column=None,
        caption_dropout_rate=0.0,
    )  # fmt: skip
    tokenizer = lambda caption, **kwargs: argparse.Namespace(input_ids=[caption])  # noqa: E731
    make_dataset = captioned_dataset_factory(args, FrozenModels(vae=None, text_encoder=None, tokenizer=tokenizer))
    assert make_dataset(images, 0, "U").captions == ["dog 0", "dog 1"]
    assert make_dataset(images, 0, "S").captions[0] == expected_s_caption


@pytest.mark.slow
def test_two_processes_train_lora_with_validation_and_resume(tiny_sd_pipeline, captioned_data, tmp_path):
    """accelerate launch --num_processes 2 (gloo): U's 8 images give one batch of 4 per process and step.

    S (3 images, 2 per step) is smaller than two processes' batches: its short last batch is kept and
    completed by Accelerate, so each process still gets S images every step."""
    output_dir = tmp_path / "out"
    args = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, *VALIDATION)
    result = run_script(SCRIPT, *args, "--max_train_steps", "2", num_processes=2)
    assert_ok(result)
    assert result.stderr.count("U: 8 images, S: 3 images") == 2  # both processes trained
    checkpoint = output_dir / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    # Validation runs on the main process only: the grid before training and after each of the 2 epochs.
    grids = sorted(p.name for p in (output_dir / "validation").glob("*.png"))
    assert grids == ["before-training.png", "step-000001.png", "step-000002.png"]

    before_grid_written = (output_dir / "validation" / "before-training.png").stat().st_mtime_ns
    resumed = run_script(SCRIPT, *args, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", num_processes=2)
    assert_ok(resumed)
    assert sorted(step for step, _ in scalars(output_dir)["loss"]) == [1, 2, 3, 4]
    # A resume does not redraw the base model's grid: the model has moved on.
    assert (output_dir / "validation" / "before-training.png").stat().st_mtime_ns == before_grid_written
    assert (
        load_file(output_dir / "pytorch_lora_weights.safetensors").keys()
        == load_file(checkpoint / "pytorch_lora_weights.safetensors").keys()
    )


@pytest.mark.parametrize(("accumulation", "expected"), [(1, [1] * 8), (3, [3, 3, 2])])
def test_gradient_accumulation_steps_after_every_accumulated_u_batches(
    tiny_sd_pipeline, captioned_data, tmp_path, accumulation, expected
):
    """8 U batches of 1 in the epoch; S's pass is 3 batches of 1, which ends inside the accumulation cycles."""
    output_dir = tmp_path / "out"
    args = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--num_train_epochs", "1")
    args[args.index("--train_batch_size") + 1] = "1"
    args += ["--sensitive_batch_size", "1", "--gradient_accumulation_steps", str(accumulation)]
    assert forwards_per_optimizer_step(SCRIPT, *args, record_path=tmp_path / "record.json") == expected
    assert [step for step, _ in scalars(output_dir)["loss"]] == list(range(1, len(expected) + 1))


def test_lora_resume_inside_an_accumulation_epoch_replays_the_run(tiny_sd_pipeline, captioned_data, tmp_path):
    """Accumulation 3 over 8 U batches of 1: checkpoint-1 sits after 3 of them (and one pass of S)."""

    def args(output_dir, *extra):
        base = run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, "--num_train_epochs", "1", *extra)
        base[base.index("--train_batch_size") + 1] = "1"
        base[base.index("--checkpointing_steps") + 1] = "1"
        return base + ["--sensitive_batch_size", "1", "--gradient_accumulation_steps", "3", "--random_flip"]

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference_trace, resumed_trace = resume_from_a_copy(SCRIPT, args, reference, resumed, "checkpoint-1")
    assert sorted(resumed_trace) == [2, 3]
    assert all(resumed_trace[step] == reference_trace[step] for step in (2, 3))
    final_reference = load_file(reference / "pytorch_lora_weights.safetensors")
    final_resumed = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final_resumed[key], value) for key, value in final_reference.items())


def test_lora_flags_shape_the_adapter_and_it_loads_back_the_same(tiny_sd_pipeline, captioned_data, tmp_path, capsys):
    """--lora_alpha, --lora_dropout, --lora_layers and --use_dora reach the adapter, the saved file carries them
    so that load_lora_weights rebuilds the same adapter; with --optimizer prodigy, --max_train_samples,
    --allow_tf32 and --upcast_before_saving under bf16 in the same run."""
    from diffusers import DiffusionPipeline

    output_dir = tmp_path / "out"
    flags = ["--lora_alpha", "8", "--lora_dropout", "0.1", "--lora_layers", "to_q,to_v", "--use_dora"]
    flags += ["--optimizer", "prodigy", "--learning_rate", "1.0", "--max_train_samples", "6", "--allow_tf32"]
    flags += ["--upcast_before_saving", "--image_interpolation_mode", "bicubic", "--max_train_steps", "2"]
    result = run_script(
        SCRIPT, *run_args(tiny_sd_pipeline, captioned_data, output_dir, *LORA, *flags), mixed_precision="bf16"
    )
    assert_ok(result)
    assert "training on 6 of U's 8 images" in result.stderr and "U: 6 images" in result.stderr
    assert "--allow_tf32: float32 matrix products" in result.stderr

    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}  # --upcast_before_saving
    projections = {key.split(".lora")[0].rsplit(".", 1)[-1] for key in weights}
    assert projections == {"to_q", "to_v"}
    assert any(key.endswith("lora_magnitude_vector") for key in weights)  # DoRA's magnitudes
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    pipeline.load_lora_weights(output_dir)
    (config,) = pipeline.unet.peft_config.values()
    # The dropout is a training setting: in the file it would make every generation differ.
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_dora) == (4, 8, 0.0, True)
    assert set(config.target_modules) == {"to_q", "to_v"}
    images = [
        pipeline("a red square", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        for _ in range(2)
    ]
    assert np.array_equal(images[0].images, images[1].images)

    optimizer_state = torch.load(output_dir / "checkpoint-2" / "optimizer.bin", weights_only=False)
    assert "d" in optimizer_state["param_groups"][0]  # Prodigy's step-size estimate
    card = (output_dir / "README.md").read_text()
    assert "LoRA (rank 4, alpha 8, DoRA)" in card

    # A resume must build the same adapter.
    other = run_args(
        tiny_sd_pipeline, captioned_data, output_dir, *LORA, *flags[2:], "--resume_from_checkpoint", "latest"
    )
    assert "--lora_alpha None: checkpoint-2 was trained with --lora_alpha 8" in refusal(t2i, other, capsys)


def test_prodigy_without_prodigyopt_says_what_to_install(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "prodigyopt" else real_find_spec(name, *rest)
    )
    args = argparse.Namespace(optimizer="prodigy", use_8bit_adam=False, learning_rate=1.0)
    with pytest.raises(InputError, match="pip install prodigyopt"):
        check_optimizer(args)


def test_cached_latents_follow_the_uncached_run_and_resume_exactly(tiny_sd_pipeline, captioned_data, tmp_path):
    """With --random_flip and the centre crop, --cache_latents gives the loss trace of the run without it (to
    float rounding: the VAE encodes other batches), and a run resumed from its checkpoint replays it."""

    def cached_args(output_dir, *extra):
        flags = ["--center_crop", "--random_flip", "--num_train_epochs", "3", "--checkpointing_steps", "3"]
        return run_args(tiny_sd_pipeline, captioned_data, output_dir, "--use_lora", *flags, *extra)

    plain = tmp_path / "plain"
    assert_ok(run_script(SCRIPT, *cached_args(plain)))
    reference, resumed = resume_from_a_copy(
        SCRIPT,
        lambda output_dir, *extra: cached_args(output_dir, "--cache_latents", *extra),
        tmp_path / "cached",
        tmp_path / "resumed",
        "checkpoint-3",
    )
    uncached = dict(scalars(plain)["loss"])
    assert sorted(uncached) == sorted(reference) == list(range(1, 7))
    assert [reference[step] for step in uncached] == pytest.approx(list(uncached.values()), rel=1e-4)
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[step] == reference[step] for step in resumed)
    cached = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    replayed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(cached[key], replayed[key]) for key in cached)


def write_mixed_folder(path, sizes, caption, seed):
    """Random RGB images of the given (height, width), all under one caption."""
    rng = np.random.default_rng(seed)
    path.mkdir()
    rows = []
    for index, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path / f"{index}.png")
        rows.append(f'{{"file_name": "{index}.png", "text": "{caption}"}}')
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


def test_aspect_ratio_buckets_train_cached_batches_of_one_size_and_resume_exactly(tiny_sd_pipeline, tmp_path, caplog):
    """U: 4 square, 3 wide and 3 tall photos; S: 2 wide and 1 square. Buckets 32x32, 32x48 and 48x32 at batch 2
    give 2 + 2 + 2 U batches an epoch, so 2 epochs are 12 steps; a resume from checkpoint-3 replays the run,
    and the adapters load into the pipeline, which draws the wide size."""
    import shutil

    from diffusers import StableDiffusionPipeline

    unlabeled = write_mixed_folder(tmp_path / "u", [(32, 32)] * 4 + [(32, 64)] * 3 + [(64, 32)] * 3, "a cat", 0)
    sensitive = write_mixed_folder(tmp_path / "s", [(40, 80), (36, 60), (30, 30)], "a dog", 1)

    def bucket_args(output_dir, *extra):
        flags = ["--aspect_ratio_buckets", "32,32;32,48;48,32", "--cache_latents", "--random_flip", *LORA]
        flags += ["--num_train_epochs", "2", "--checkpointing_steps", "3", "--train_batch_size", "2"]
        return run_args(tiny_sd_pipeline, (unlabeled, sensitive), output_dir, *flags, *extra)

    full, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    reference, resumed = resume_from_a_copy(SCRIPT, bucket_args, full, resumed_dir, "checkpoint-3")
    assert sorted(reference) == list(range(1, 13)) and sorted(resumed) == list(range(4, 13))
    assert all(resumed[step] == reference[step] for step in resumed)
    trained = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    replayed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(trained[key], replayed[key]) for key in trained)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline)
    pipeline.load_lora_weights(tmp_path / "full")
    image = pipeline("a cat", height=32, width=48, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 48, 3)

    other = tmp_path / "other"  # resumed with other buckets: it trains on, but is told it will not replay
    shutil.copytree(full / "checkpoint-3", other / "checkpoint-3")
    argv = [str(arg) for arg in bucket_args(other, "--resume_from_checkpoint", "latest")]
    argv[argv.index("--aspect_ratio_buckets") + 1] = "32,32"
    with caplog.at_level("WARNING", logger="pu_diffusion.checks"):
        t2i.parse_args(argv)
    assert "--aspect_ratio_buckets [[32, 32]] differs from checkpoint-3's [[32, 32], [32, 48], [48, 32]]" in caplog.text


def test_lora_checkpoint_is_saved_from_the_gathered_weights_when_sharded(tiny_sd_pipeline, tmp_path):
    """Under ZeRO-3 or FSDP the adapters the unwrapped UNet holds are shards: the checkpoint's LoRA file is
    written from accelerator.get_state_dict."""
    from diffusers import UNet2DConditionModel

    from tests.sharded import ShardedAccelerator

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_pipeline, subfolder="unet")
    add_lora(unet, rank=4)
    adapters = [parameter for name, parameter in unet.named_parameters() if "lora_" in name]
    with torch.no_grad():
        for parameter in adapters:
            parameter.fill_(0.5)
        gathered = {key: value.clone() for key, value in unet.state_dict().items()}
        for parameter in adapters:
            parameter.zero_()
    accelerator = ShardedAccelerator(gathered)
    register_lora_hooks(accelerator, unet)
    accelerator.save_hook([unet], [], str(tmp_path))
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert accelerator.gather_calls == 1
    assert len(saved) == len(adapters) and all(bool((tensor == 0.5).all()) for tensor in saved.values())


# --------------------------------------------------------------------------- SDXL


def test_sdxl_lora_trains_resumes_exactly_and_loads_into_the_sdxl_pipeline(
    tiny_sdxl_pipeline, captioned_data, tmp_path
):
    """The same script on an SDXL base: both text encoders, the pooled embedding and the time ids; LoRA weights
    that StableDiffusionXLPipeline.load_lora_weights takes; a resume from checkpoint-2 replays the run."""
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    def sdxl_args(output_dir, *extra):
        flags = [*LORA, "--max_train_steps", "4", "--random_flip", *VALIDATION]
        return run_args(tiny_sdxl_pipeline, captioned_data, output_dir, *flags, *extra)

    reference, resumed = resume_from_a_copy(SCRIPT, sdxl_args, tmp_path / "full", tmp_path / "resumed", "checkpoint-2")
    assert sorted(reference) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert all(resumed[step] == reference[step] for step in resumed)
    trained = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    replayed = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(trained[key], replayed[key]) for key in trained)

    pipeline = DiffusionPipeline.from_pretrained(tiny_sdxl_pipeline)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    before = generate(pipeline)
    pipeline.load_lora_weights(tmp_path / "full")
    after = generate(pipeline)
    assert after.shape == (1, 32, 32, 3) and np.abs(after - before).max() > 1e-3
    card = (tmp_path / "full" / "README.md").read_text()
    assert "Stable Diffusion XL LoRA (rank 4)" in card and "stable-diffusion-xl" in card
    assert (tmp_path / "full" / "validation" / "before-training.png").is_file()


def test_sdxl_full_fine_tune_saves_a_complete_sdxl_pipeline_with_its_own_vae(
    tiny_sdxl_pipeline, captioned_data, tmp_path
):
    """Full fine-tuning under bf16 with --pretrained_vae_model_name_or_path, EMA and cached latents (without
    --center_crop, as the Diffusers scripts allow): a complete StableDiffusionXLPipeline folder whose VAE is that
    one, in float32 as it was saved."""
    from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline

    vae_dir = tmp_path / "vae"
    AutoencoderKL.from_pretrained(tiny_sdxl_pipeline, subfolder="vae").save_pretrained(vae_dir)
    output_dir = tmp_path / "out"
    flags = ["--pretrained_vae_model_name_or_path", vae_dir, "--use_ema", "--cache_latents"]
    args = run_args(tiny_sdxl_pipeline, captioned_data, output_dir, *flags, "--max_train_steps", "2")
    result = run_script(SCRIPT, *args, mixed_precision="bf16")
    assert_ok(result)
    assert "frozen weights in torch.bfloat16 (VAE torch.bfloat16)" in result.stderr
    assert "--cache_latents without --center_crop: one random crop per image of U, kept" in result.stderr

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert pipeline.vae.dtype == torch.float32
    saved_vae, own_vae = pipeline.vae.state_dict(), AutoencoderKL.from_pretrained(vae_dir).state_dict()
    assert all(torch.equal(saved_vae[key], own_vae[key]) for key in own_vae)
    base = DiffusionPipeline.from_pretrained(tiny_sdxl_pipeline).unet.state_dict()
    assert any(not torch.equal(pipeline.unet.state_dict()[key], base[key]) for key in base)
    assert generate(pipeline).shape == (1, 32, 32, 3)
    assert "Stable Diffusion XL fine-tune" in (output_dir / "README.md").read_text()


def test_sdxl_full_fine_tune_resumes_exactly(tiny_sdxl_pipeline, captioned_data, tmp_path):
    from diffusers import UNet2DConditionModel

    def full_args(output_dir, *extra):
        flags = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--learning_rate", "1e-3", *extra]
        return run_args(tiny_sdxl_pipeline, captioned_data, output_dir, *flags)

    reference, resumed = resume_from_a_copy(SCRIPT, full_args, tmp_path / "full", tmp_path / "resumed", "checkpoint-2")
    assert sorted(resumed) == [3] and resumed[3] == reference[3]
    trained = UNet2DConditionModel.from_pretrained(tmp_path / "full", subfolder="unet").state_dict()
    replayed = UNet2DConditionModel.from_pretrained(tmp_path / "resumed", subfolder="unet").state_dict()
    assert all(torch.equal(trained[key], replayed[key]) for key in trained)


def test_sdxl_vae_stays_float32_without_a_vae_of_its_own(tiny_sdxl_pipeline):
    """As in the official SDXL script: SDXL's own VAE overflows in float16, so it is not cast."""
    from diffusers import UNet2DConditionModel

    args = argparse.Namespace(
        pretrained_model_name_or_path=str(tiny_sdxl_pipeline), pretrained_vae_model_name_or_path=None,
        revision=None, variant=None, cache_dir=None, prediction_type=None, use_lora=True,
    )  # fmt: skip
    frozen, unet, _ = load_models(args)
    assert frozen.is_sdxl and isinstance(unet, UNet2DConditionModel)
    add_lora(unet, rank=2)
    place_models(unet, frozen, torch.device("cpu"), "fp16", args)
    assert frozen.vae.dtype == torch.float32
    assert frozen.text_encoder.dtype == frozen.text_encoder_2.dtype == torch.float16


def test_sdxl_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(tiny_sdxl_pipeline):
    """Penultimate hidden states of both encoders side by side and the second's pooled projection, as
    StableDiffusionXLPipeline.encode_prompt gives them; the batch's time ids passed through."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tiny_sdxl_pipeline)
    frozen = FrozenModels(
        family="sdxl",
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        text_encoder_2=pipeline.text_encoder_2,
        tokenizer_2=pipeline.tokenizer_2,
    )
    make_dataset = captioned_dataset_factory(
        argparse.Namespace(
            resolution=8, center_crop=True, random_flip=False, image_interpolation_mode="lanczos",
            image_column="image", caption_column="text", label_column=None, sensitive_prompt=None,
            caption_dropout_rate=0.0,
        ),
        frozen,
    )  # fmt: skip
    import datasets

    images = datasets.Dataset.from_dict({"image": [Image.new("RGB", (16, 12))], "text": ["a photo of a dog"]})
    item = make_dataset(images, 0, "U")[0]
    # Original (height, width), the centre crop's top-left in the 11 x 8 resized image, the target size.
    assert item["time_ids"].tolist() == [12, 16, 0, 1, 8, 8]
    batch = {key: value[None] for key, value in item.items() if key != "pixel_values"}
    states, added = encode_prompts(frozen, [batch])
    expected_states, _, expected_pooled, _ = pipeline.encode_prompt(
        "a photo of a dog", do_classifier_free_guidance=False
    )
    assert torch.allclose(states, expected_states, atol=1e-6)
    assert torch.allclose(added["text_embeds"], expected_pooled, atol=1e-6)
    assert torch.equal(added["time_ids"], item["time_ids"][None])


def test_evaluation_scores_an_sdxl_lora(tiny_sdxl_pipeline, tiny_clip_model, captioned_data, tmp_path):
    """evaluate.py text-to-image takes an SDXL base and its LoRA; the LoRA changes what the judge sees."""
    import csv
    import json

    output_dir = tmp_path / "lora"
    assert_ok(
        run_script(SCRIPT, *run_args(tiny_sdxl_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "2"))
    )
    common = ["--prompt", "a photo of a dog", "--images_per_prompt", "2", "--num_inference_steps", "2"]
    common += ["--clip_model", tiny_clip_model, "--normal_text", "a cat", "--sensitive_text", "a dog", "--clip_score"]
    probabilities = {}
    for name, lora in (("base", []), ("lora", ["--lora", output_dir])):
        evaluation = tmp_path / f"evaluation-{name}"
        args = ["text-to-image", "--pipeline", tiny_sdxl_pipeline, *lora, *common, "--output_dir", evaluation]
        assert_ok(run_script("evaluate.py", *args))
        assert json.loads((evaluation / "metrics.json").read_text())["num_images"] == 2
        with open(evaluation / "per_image.csv", newline="") as stream:
            probabilities[name] = [float(row["sensitive_probability"]) for row in csv.DictReader(stream)]
    assert len(probabilities["lora"]) == 2 and probabilities["lora"] != probabilities["base"]
