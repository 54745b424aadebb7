"""train_pu_text_to_image.py on Stable Diffusion 3: flow matching, LoRA on the transformer, full fine-tuning."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_pu_text_to_image as t2i
from pu_diffusion.lora import SD3_LORA_LAYERS
from tests.helpers import assert_ok, refusal, run_script
from tests.helpers import text_to_image_run_args as run_args

SCRIPT = "train_pu_text_to_image.py"
LORA = ["--use_lora", "--rank", "4", "--checkpointing_steps", "2"]
VALIDATION = ["--validation_prompt", "a photo of a dog", "--num_validation_images", "2", "--validation_steps", "2"]


def generate(pipeline, prompt="a photo of a dog"):
    generator = torch.Generator().manual_seed(0)
    return pipeline(prompt, num_inference_steps=2, generator=generator, output_type="np").images


@pytest.fixture(scope="module")
def sd3_lora_run(tiny_sd3_pipeline, captioned_data, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sd3_lora") / "out"
    args = run_args(tiny_sd3_pipeline, captioned_data, output_dir, *LORA, *VALIDATION, "--max_train_steps", "4")
    result = run_script(SCRIPT, *args)
    assert_ok(result)
    # U's two captions (cat, dog) and S's one (dog): their text states are computed once, not at every step.
    assert "SD3: text states of 2 distinct captions computed once" in result.stderr
    return output_dir


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_text_states_are_the_pipelines_own(with_t5, tiny_sd3_pipeline):
    """The training step's text states and pooled projections equal StableDiffusion3Pipeline.encode_prompt's:
    CLIP's tokens, then T5's (zeros without T5)."""
    from diffusers import StableDiffusion3Pipeline

    from pu_diffusion.frozen_models import encode_prompts
    from pu_diffusion.text_to_image import FrozenModels

    drop_t5 = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline, **drop_t5)
    captions = ["a photo of a dog", "a photo of a cat"]
    expected, _, expected_pooled, _ = pipeline.encode_prompt(
        captions, None, None, do_classifier_free_guidance=False, max_sequence_length=20
    )
    frozen = FrozenModels(
        family="sd3",
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        text_encoder_2=pipeline.text_encoder_2,
        tokenizer_2=pipeline.tokenizer_2,
        text_encoder_3=pipeline.text_encoder_3,
        tokenizer_3=pipeline.tokenizer_3,
        joint_attention_dim=pipeline.transformer.config.joint_attention_dim,
        max_sequence_length=20,
    )

    def ids(tokenizer, length):
        return tokenizer(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt")

    batch = {
        "input_ids": ids(pipeline.tokenizer, pipeline.tokenizer.model_max_length).input_ids,
        "input_ids_2": ids(pipeline.tokenizer_2, pipeline.tokenizer_2.model_max_length).input_ids,
    }
    if with_t5:
        batch["input_ids_3"] = ids(pipeline.tokenizer_3, 20).input_ids
    states, added = encode_prompts(frozen, [batch])
    assert states.shape == expected.shape == (2, 16 + 20, 64)  # 16 CLIP tokens, 20 of T5
    assert torch.allclose(states, expected, atol=1e-6)
    assert torch.allclose(added["pooled_projections"], expected_pooled)
    assert with_t5 == bool(states[:, 16:].abs().sum())


def test_sd3_lora_run_saves_adapters_that_load_into_the_sd3_pipeline(sd3_lora_run, tiny_sd3_pipeline):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    weights = load_file(sd3_lora_run / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)
    adapted = {key.split(".lora")[0].split(".", 3)[-1] for key in weights}  # e.g. attn.add_k_proj
    assert adapted == set(SD3_LORA_LAYERS)  # the SD3 LoRA script's default layers, both blocks
    assert not (sd3_lora_run / "model_index.json").exists()

    pipeline = DiffusionPipeline.from_pretrained(tiny_sd3_pipeline)
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    before = generate(pipeline)
    pipeline.load_lora_weights(sd3_lora_run)
    (adapter,) = pipeline.transformer.peft_config
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name=adapter)
    assert {f"transformer.{key}" for key in loaded} == set(weights)  # every weight found its layer
    assert all(torch.equal(loaded[key.removeprefix("transformer.")], weights[key]) for key in weights)
    after = generate(pipeline)
    assert after.shape == (1, 32, 32, 3) and np.abs(after - before).max() > 1e-3

    card = (sd3_lora_run / "README.md").read_text()
    assert "Stable Diffusion 3 LoRA (rank 4)" in card and "- sd3" in card and "load_lora_weights" in card
    assert (sd3_lora_run / "validation" / "step-000004.png").is_file()
    assert (sd3_lora_run / "validation" / "before-training.png").is_file()


def test_sd3_lora_resume_restores_the_adapters_exactly(sd3_lora_run, tiny_sd3_pipeline, captioned_data, tmp_path):
    output_dir = tmp_path / "out"
    first_half = run_args(tiny_sd3_pipeline, captioned_data, output_dir, *LORA, *VALIDATION, "--max_train_steps", "2")
    assert_ok(run_script(SCRIPT, *first_half))
    resumed = run_args(tiny_sd3_pipeline, captioned_data, output_dir, *LORA, *VALIDATION, "--max_train_steps", "4")
    assert_ok(run_script(SCRIPT, *resumed, "--resume_from_checkpoint", "latest"))
    for name in ("checkpoint-2/pytorch_lora_weights.safetensors", "pytorch_lora_weights.safetensors"):
        reference, replayed = load_file(sd3_lora_run / name), load_file(output_dir / name)
        assert reference.keys() == replayed.keys()
        assert all(torch.equal(reference[key], replayed[key]) for key in reference), name


def test_sd3_full_fine_tune_with_ema_cached_latents_and_checkpointing_without_t5_saves_and_resumes_exactly(
    tiny_sd3_pipeline_without_t5, captioned_data, tmp_path
):
    from diffusers import DiffusionPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline

    base = tiny_sd3_pipeline_without_t5
    flags = ["--checkpointing_steps", "1", "--weighting_scheme", "mode", "--precondition_outputs", "0"]
    flags += ["--use_ema", "--ema_max_decay", "0.5", "--cache_latents", "--gradient_checkpointing"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert_ok(run_script(SCRIPT, *run_args(base, captioned_data, straight, *flags, "--max_train_steps", "2")))
    assert_ok(run_script(SCRIPT, *run_args(base, captioned_data, halves, *flags, "--max_train_steps", "1")))
    resumed = run_args(base, captioned_data, halves, *flags, "--max_train_steps", "2")
    assert_ok(run_script(SCRIPT, *resumed, "--resume_from_checkpoint", "latest"))

    without_t5 = {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = DiffusionPipeline.from_pretrained(straight, **without_t5)
    assert isinstance(pipeline, StableDiffusion3Pipeline)
    assert generate(pipeline).shape == (1, 32, 32, 3)
    untrained = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer").state_dict()
    checkpoint = SD3Transformer2DModel.from_pretrained(straight / "checkpoint-1", subfolder="transformer")
    ema = SD3Transformer2DModel.from_pretrained(straight / "checkpoint-1", subfolder="transformer_ema")
    trained = pipeline.transformer.state_dict()
    replayed = DiffusionPipeline.from_pretrained(halves, **without_t5).transformer.state_dict()
    assert any(not torch.equal(trained[key], untrained[key]) for key in trained)
    assert any(not torch.equal(trained[key], value) for key, value in checkpoint.state_dict().items())
    assert any(not torch.equal(checkpoint.state_dict()[key], value) for key, value in ema.state_dict().items())
    assert all(torch.equal(trained[key], replayed[key]) for key in trained)
    card = (straight / "README.md").read_text()
    assert "Stable Diffusion 3 fine-tune" in card
    assert f'DiffusionPipeline.from_pretrained("{straight.name}", text_encoder_3=None, tokenizer_3=None)' in card


BAD_SD3_INPUT = {
    "Min-SNR on SD3": (["--snr_gamma", "5"], "--snr_gamma is for DDPM-trained UNets"),
    "prediction type on SD3": (["--prediction_type", "epsilon"], "--prediction_type is for DDPM-trained UNets"),
    "noise offset on SD3": (["--noise_offset", "0.1"], "--noise_offset is for DDPM-trained UNets"),
    "DDPM timestep band on SD3": (["--sensitive_min_timestep", "100"], "--sensitive_min_timestep is for DDPM"),
    "UNet LoRA layer on SD3": (["--use_lora", "--lora_layers", "to_q,conv1"], "conv1 names no module"),
}


@pytest.mark.parametrize("case", sorted(BAD_SD3_INPUT))
def test_flags_that_mean_nothing_on_sd3_are_refused(case, tiny_sd3_pipeline, captioned_data, tmp_path, capsys):
    extra, expected = BAD_SD3_INPUT[case]
    args = run_args(tiny_sd3_pipeline, captioned_data, tmp_path / "out", "--max_train_steps", "1", *extra)
    assert expected in refusal(t2i, args, capsys)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_t5_flag_without_t5_is_refused(tiny_sd3_pipeline_without_t5, captioned_data, tmp_path, capsys):
    args = run_args(tiny_sd3_pipeline_without_t5, captioned_data, tmp_path / "out", "--max_sequence_length", "128")
    assert "--max_sequence_length 128: it sets T5's tokens" in refusal(t2i, args, capsys)


@pytest.mark.parametrize("flag, value", [("--weighting_scheme", "mode"), ("--precondition_outputs", "0")])
def test_sd3_flags_are_refused_on_stable_diffusion(flag, value, tiny_sd_pipeline, captioned_data, tmp_path, capsys):
    args = run_args(tiny_sd_pipeline, captioned_data, tmp_path / "out", "--max_train_steps", "1", flag, value)
    assert f"{flag} is a Stable Diffusion 3 flag" in refusal(t2i, args, capsys)


class RecordingTransformer(torch.nn.Module):
    """Predicts a zero velocity and records the images and the sigmas' timesteps it was called with."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        self.calls.append((hidden_states.shape[0], timestep))
        return (torch.zeros_like(hidden_states),)


def test_sd3_step_runs_the_transformer_once_and_regresses_the_velocity(tiny_sd3_pipeline):
    """One forward over cat([U, S]); with a zero velocity each l(x) is the scheme's weight times
    ||noise - x_0||^2, and the S terms count only draws with ((1 - sigma) / sigma)^2 <= 8.6."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from pu_diffusion.flow_matching import FlowMatchingSettings
    from pu_diffusion.objective import LossSettings
    from pu_diffusion.text_to_image import FrozenModels, training_step
    from pu_loss import compute_risk, flow_matching_snr

    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline, text_encoder_3=None, tokenizer_3=None)
    frozen = FrozenModels(
        family="sd3", vae=base.vae, text_encoder=base.text_encoder, tokenizer=None,
        text_encoder_2=base.text_encoder_2, joint_attention_dim=64,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    loss = LossSettings(loss_type="pu", prior=0.1, nonnegative="abs", positive_risk_weight=0.0, sensitive_max_snr=8.6)
    flow = FlowMatchingSettings(weighting_scheme="cosmap", precondition_outputs=False)
    transformer = RecordingTransformer()
    run = SimpleNamespace(frozen=frozen, model=transformer, noise_scheduler=scheduler, loss=loss, flow=flow)

    def batch(count):
        return {
            "pixel_values": torch.rand(count, 3, 32, 32) * 2 - 1,
            "input_ids": torch.randint(2, 100, (count, 16)),
            "input_ids_2": torch.randint(2, 100, (count, 16)),
        }

    unlabeled, sensitive = batch(6), batch(4)
    risk = training_step(run, unlabeled, sensitive, None, torch.Generator().manual_seed(3))
    assert len(transformer.calls) == 1 and transformer.calls[0][0] == 10

    # Replay the step's draws: latents (VAE sample), noise, then u for the sigmas, in that order.
    generator = torch.Generator().manual_seed(3)
    pixels = torch.cat([unlabeled["pixel_values"], sensitive["pixel_values"]])
    sample = base.vae.encode(pixels).latent_dist.sample(generator=generator)
    latents = (sample - 0.1) * base.vae.config.scaling_factor  # the tiny VAE's shift_factor
    noise = torch.randn(latents.shape, generator=generator)
    u = torch.rand(10, generator=generator)  # cosmap draws sigma uniformly from the grid
    sigmas = scheduler.sigmas[(u * 1000).long()]
    assert torch.allclose(transformer.calls[0][1], sigmas * 1000)
    weights = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    per_sample = weights * ((noise - latents) ** 2).sum(dim=(1, 2, 3))
    in_band = flow_matching_snr(sigmas) <= 8.6
    assert in_band.any() and not in_band.all()  # both sides of the band are in this draw
    expected = compute_risk(per_sample, 6, "pu", 0.1, "abs", 0.0, in_band)
    assert torch.allclose(risk.loss, expected.loss, rtol=1e-5)


def test_evaluate_scores_an_sd3_lora(sd3_lora_run, tiny_sd3_pipeline, tmp_path):
    import evaluate
    from pu_diffusion.pipelines import generate_from_prompts, load_text_to_image_pipeline

    generated = {}
    for name, extra in (("base", []), ("lora", ["--lora", str(sd3_lora_run)])):
        argv = ["text-to-image", "--pipeline", str(tiny_sd3_pipeline), "--prompt", "a photo of a dog"]
        argv += ["--images_per_prompt", "1", "--num_inference_steps", "2", "--output_dir", str(tmp_path / name)]
        argv += ["--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b", *extra]
        parsed = evaluate.parse_args(argv)
        pipeline = load_text_to_image_pipeline(parsed, "cpu", torch.float32)
        generated[name] = generate_from_prompts(pipeline, parsed, "cpu")[0]
    assert generated["base"].shape == (1, 3, 32, 32)
    assert not torch.equal(generated["base"], generated["lora"])


@pytest.mark.slow
def test_two_processes_train_an_sd3_lora(tiny_sd3_pipeline, captioned_data, tmp_path):
    """accelerate launch --num_processes 2 (gloo): each process trains on its share of U and S, one
    checkpoint holds both processes' random states, and the LoRA file loads in full."""
    from diffusers import StableDiffusion3Pipeline

    from pu_diffusion.pipelines import load_lora_in_full

    output_dir = tmp_path / "out"
    args = run_args(tiny_sd3_pipeline, captioned_data, output_dir, *LORA, "--max_train_steps", "2")
    result = run_script(SCRIPT, *args, num_processes=2)
    assert_ok(result)
    assert result.stderr.count("U: 8 images, S: 3 images") == 2  # both processes trained
    checkpoint = output_dir / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline)
    load_lora_in_full(pipeline, str(output_dir))  # refuses a file whose weights do not all find their layer
    assert generate(pipeline).shape == (1, 32, 32, 3)


def test_precomputed_text_states_are_the_encoders_and_give_way_past_the_limit(
    tiny_sd3_pipeline, captioned_data, monkeypatch
):
    """Each distinct caption (and the empty one, for dropout) is encoded once; a batch's rows give back what
    encoding its captions gives. Past MAX_PRECOMPUTED_CAPTIONS batches carry no rows and are encoded."""
    import datasets

    from pu_diffusion import frozen_models
    from pu_diffusion.frozen_models import encode_prompts
    from pu_diffusion.text_to_image import captioned_dataset_factory, load_models

    flags = sd3_loading_flags(
        tiny_sd3_pipeline, resolution=32, center_crop=True, random_flip=False, image_interpolation_mode="lanczos",
        image_column="image", caption_column="text", label_column=None, sensitive_prompt=None,
        caption_dropout_rate=0.5,
    )  # fmt: skip
    frozen = load_models(flags)[0]
    unlabeled = datasets.load_dataset("imagefolder", data_dir=str(captioned_data[0]), split="train")
    images = captioned_dataset_factory(flags, frozen)(unlabeled, 0, "U")
    assert sorted(frozen.text_states.rows) == ["", "a photo of a cat", "a photo of a dog"]
    items = [images[index, epoch] for index in range(len(images)) for epoch in range(3)]
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
    looked_up, looked_up_added = encode_prompts(frozen, [batch])
    encoded, encoded_added = encode_prompts(frozen, [{k: v for k, v in batch.items() if k != "text_state_row"}])
    # Equal up to float rounding: the captions were encoded in other batches.
    assert torch.allclose(looked_up, encoded, atol=1e-5)
    assert torch.allclose(looked_up_added["pooled_projections"], encoded_added["pooled_projections"], atol=1e-5)

    monkeypatch.setattr(frozen_models, "MAX_PRECOMPUTED_CAPTIONS", 2)
    frozen = load_models(flags)[0]
    item = captioned_dataset_factory(flags, frozen)(unlabeled, 0, "U")[0]
    assert frozen.text_states is None and "text_state_row" not in item


def test_without_t5_training_puts_as_many_zero_rows_as_the_pipeline_samples_with(tiny_sd3_pipeline_without_t5):
    import inspect

    from diffusers import StableDiffusion3Pipeline

    from pu_diffusion.text_to_image import load_models

    frozen = load_models(sd3_loading_flags(tiny_sd3_pipeline_without_t5))[0]
    sampling_default = inspect.signature(StableDiffusion3Pipeline.__call__).parameters["max_sequence_length"].default
    assert frozen.text_encoder_3 is None and frozen.max_sequence_length == sampling_default


def test_evaluate_loads_an_sd3_base_saved_without_t5(tiny_sd3_pipeline_without_t5, tmp_path):
    """Diffusers refuses such a folder unless told that T5 is absent; evaluate.py tells it."""
    from diffusers import DiffusionPipeline

    import evaluate
    from pu_diffusion.pipelines import load_text_to_image_pipeline

    with pytest.raises(ValueError, match="text_encoder_3"):
        DiffusionPipeline.from_pretrained(tiny_sd3_pipeline_without_t5)
    argv = ["text-to-image", "--pipeline", str(tiny_sd3_pipeline_without_t5), "--prompt", "a photo of a dog"]
    argv += ["--output_dir", str(tmp_path), "--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b"]
    pipeline = load_text_to_image_pipeline(evaluate.parse_args(argv), "cpu", torch.float32)
    assert pipeline.text_encoder_3 is None and generate(pipeline).shape == (1, 32, 32, 3)


def sd3_loading_flags(pipeline, **given) -> argparse.Namespace:
    """What text_to_image.load_models reads, for an SD3 pipeline folder with no flag given but ``given``."""
    flags = argparse.Namespace(
        pretrained_model_name_or_path=str(pipeline), revision=None, variant=None, cache_dir=None,
        pretrained_vae_model_name_or_path=None, max_sequence_length=None, snr_gamma=None, prediction_type=None,
        noise_offset=0.0, sensitive_min_timestep=0, weighting_scheme=None, logit_mean=None, logit_std=None,
        mode_scale=None, precondition_outputs=None,
    )  # fmt: skip
    return argparse.Namespace(**{**vars(flags), **given})


@pytest.fixture(scope="module")
def sd3_with_a_short_t5_tokenizer(tiny_sd3_pipeline, tmp_path_factory) -> Path:
    """The tiny SD3 whose T5 tokenizer holds 6 tokens, as a small base's word tokenizer does."""
    import shutil

    path = tmp_path_factory.mktemp("short_t5") / "pipeline"
    shutil.copytree(tiny_sd3_pipeline, path)
    config_file = path / "tokenizer_3" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "model_max_length": 6}))
    return path


def test_t5_length_defaults_to_the_scripts_or_the_tokenizers_where_shorter_in_training_and_sampling(
    tiny_sd3_pipeline, sd3_with_a_short_t5_tokenizer, tiny_sd_pipeline, tmp_path
):
    """Training's default is the SD3 scripts' 77 and sampling's the pipeline's 256, unless the T5 tokenizer is
    shorter: then both take its length, so that a small base samples with the text stream it was trained on."""
    from diffusers import StableDiffusion3Pipeline

    import evaluate
    from pu_diffusion.errors import InputError
    from pu_diffusion.pipelines import load_text_to_image_pipeline, sampling_arguments
    from pu_diffusion.text_to_image import load_models

    assert load_models(sd3_loading_flags(tiny_sd3_pipeline))[0].max_sequence_length == 77
    short = load_models(sd3_loading_flags(sd3_with_a_short_t5_tokenizer))[0]
    assert short.max_sequence_length == 6 and short.sampling_arguments() == {"max_sequence_length": 6}
    given = load_models(sd3_loading_flags(sd3_with_a_short_t5_tokenizer, max_sequence_length=9))[0]
    assert given.max_sequence_length == 9

    assert sampling_arguments(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline), None) == {
        "max_sequence_length": 256
    }
    assert sampling_arguments(StableDiffusion3Pipeline.from_pretrained(sd3_with_a_short_t5_tokenizer), None) == {
        "max_sequence_length": 6
    }
    assert sampling_arguments(StableDiffusion3Pipeline.from_pretrained(tiny_sd3_pipeline), 12) == {
        "max_sequence_length": 12
    }
    argv = ["text-to-image", "--pipeline", str(tiny_sd_pipeline), "--prompt", "a photo of a dog"]
    argv += ["--output_dir", str(tmp_path), "--clip_model", "x", "--normal_text", "a", "--sensitive_text", "b"]
    with pytest.raises(InputError, match="--max_sequence_length: StableDiffusionPipeline has no T5 length"):
        load_text_to_image_pipeline(evaluate.parse_args([*argv, "--max_sequence_length", "12"]), "cpu", torch.float32)
