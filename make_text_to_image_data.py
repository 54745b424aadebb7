"""Build an unlabeled text-to-image set U for the README's recipe: images the base model makes from a
generic prompt, with images of the sensitive concept mixed in under the same caption.

    python make_text_to_image_data.py \
        --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --prompt "a photo of a pet" \
        --num_generated 450 --mix_in_dir dog_photos/ --output_dir data/pets-unlabeled

The mixed-in images keep no trace of being sensitive (their caption is the
generic prompt too): that is what makes U unlabeled. The output is an image
folder with ``metadata.jsonl`` (columns ``file_name`` and ``text``), which
``--train_data_dir`` reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from PIL import Image

from pu_diffusion.checks import check_writable
from pu_diffusion.errors import InputError
from pu_diffusion.flags import NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_INT, show_ranges
from pu_diffusion.pipelines import default_device, default_dtype, generate_from_prompts, load_text_to_image_pipeline

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="The text-to-image pipeline (folder or Hub id).")
    parser.add_argument("--prompt", required=True, help="The generic prompt; also the caption of every image.")
    parser.add_argument("--num_generated", type=NON_NEGATIVE_INT, default=450, help="Images generated from --prompt.")
    parser.add_argument("--mix_in_dir", default=None, help="A folder of images of the concept to mix into U.")
    parser.add_argument("--batch_size", type=POSITIVE_INT, default=8)
    parser.add_argument("--num_inference_steps", type=POSITIVE_INT, default=30)
    parser.add_argument("--guidance_scale", type=NON_NEGATIVE_FLOAT, default=7.5)
    parser.add_argument("--resolution", type=POSITIVE_INT, default=None, help="Default: the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--output_dir", required=True)
    show_ranges(parser)
    args = parser.parse_args(argv)
    if args.mix_in_dir is not None and not mixed_in_images(args.mix_in_dir):
        parser.error(f"--mix_in_dir {args.mix_in_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) there")
    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        parser.error(f"--output_dir {args.output_dir} is not empty")
    try:
        check_writable(Path(args.output_dir))
    except InputError as error:
        parser.error(str(error))
    return args


def mixed_in_images(folder: str) -> list[Path]:
    path = Path(folder)
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []


def generate(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """--num_generated images of --prompt, through evaluate.py's sampling (batch b seeded with (seed, 0, b));
    returns their file names."""
    if args.num_generated == 0:
        return []
    device = default_device(args.device)
    loading = argparse.Namespace(pipeline=args.pipeline, lora=None, max_sequence_length=None)
    pipeline = load_text_to_image_pipeline(loading, device, default_dtype(None, device))
    sampling = argparse.Namespace(
        prompt=[args.prompt],
        images_per_prompt=args.num_generated,
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        max_sequence_length=None,  # an SD3 pipeline's own
        seed=args.seed,
    )
    images = generate_from_prompts(pipeline, sampling, device)[0]
    names = [f"generated-{index:05d}.png" for index in range(len(images))]
    for name, pixels in zip(names, images, strict=True):
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(output_dir / name)
    return names


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = generate(args, output_dir)
    for index, source in enumerate(mixed_in_images(args.mix_in_dir) if args.mix_in_dir else []):
        names.append(f"mixed-{index:05d}{source.suffix.lower()}")
        shutil.copyfile(source, output_dir / names[-1])
    rows = "".join(json.dumps({"file_name": name, "text": args.prompt}) + "\n" for name in names)
    # metadata.jsonl last: a folder without it is visibly unfinished.
    (output_dir / "metadata.jsonl").write_text(rows)
    print(f"{len(names)} images ({len(names) - args.num_generated} mixed in) -> {output_dir}")


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        sys.exit(f"error: {error}")
