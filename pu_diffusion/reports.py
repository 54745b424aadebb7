"""What evaluate.py writes besides metrics.json: the CSV rows, the sampling settings and the package versions."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from pathlib import Path

from pu_diffusion.metrics import Judgement, clip_score
from pu_diffusion.pipelines import ImageOrigin

logger = logging.getLogger(__name__)


def prompt_rows(prompts: list[str], judgement: Judgement, images_per_prompt: int) -> list[dict]:
    """per_prompt.csv: each prompt's image count, non-sensitive rate and (with --clip_score) CLIP score."""
    sensitive = judgement.sensitive.view(len(prompts), images_per_prompt)
    cosines = None if judgement.clip_cosines is None else judgement.clip_cosines.view(len(prompts), -1)
    rows = []
    for index, prompt in enumerate(prompts):
        rate = 1.0 - sensitive[index].float().mean().item()
        score = "" if cosines is None else round(clip_score(cosines[index]), 4)
        rows.append({"prompt": prompt, "images": images_per_prompt, "non_sensitive_rate": rate, "clip_score": score})
    return rows


def prompt_summaries(
    rows: list[dict], judgement: Judgement, images_per_prompt: int, fids: list[dict] | None = None
) -> list[dict]:
    """metrics.json's per-prompt entries: the rate, the FID of the prompt's images when there is a reference,
    and, with a classifier, how many images fell in each class (what the accuracy on a prompt that names a
    class is read from)."""
    summaries = [{"prompt": row["prompt"], "non_sensitive_rate": row["non_sensitive_rate"]} for row in rows]
    for summary, fid in zip(summaries, fids or [], strict=False):
        summary.update(fid)
    if judgement.predicted_labels is not None:
        for index, summary in enumerate(summaries):
            labels = judgement.predicted_labels[index * images_per_prompt : (index + 1) * images_per_prompt]
            summary["prediction_counts"] = dict(Counter(labels))
    return summaries


def image_rows(prompts: list[str], origins: list[ImageOrigin], judgement: Judgement) -> list[dict]:
    """per_image.csv: enough to make each image again (prompt, batch seed and size, position) and the verdict."""
    return [
        {
            "prompt_index": origin.prompt_index,
            "prompt": prompts[origin.prompt_index],
            "image_index": origin.image_index,
            "batch_seed": origin.batch_seed,
            "batch_size": origin.batch_size,
            "position_in_batch": origin.position,
            "sensitive_probability": round(float(probability), 6),
            "verdict": "sensitive" if sensitive else "normal",
            **({} if judgement.predicted_labels is None else {"predicted_label": judgement.predicted_labels[index]}),
        }
        for index, (origin, probability, sensitive) in enumerate(
            zip(origins, judgement.sensitive_probability, judgement.sensitive.tolist(), strict=True)
        )
    ]


def class_rows(prediction_counts: dict[str, int], sensitive_labels: list[str]) -> list[dict]:
    """per_class.csv: how many samples the classifier put in each class, and whether that class is sensitive."""
    total = sum(prediction_counts.values())
    sensitive = {str(label) for label in sensitive_labels}
    return [
        {"label": label, "sensitive": label in sensitive, "samples": count, "share": count / total}
        for label, count in prediction_counts.items()
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def sampling_settings(args: argparse.Namespace, steps: int, device: str) -> dict:
    settings = {key: value for key, value in vars(args).items() if key not in ("command",)}
    settings.update(num_inference_steps=steps, device=device)
    return settings


# Training on the CPU is deterministic for one set of these; other versions move the scores a little.
VERSIONED_PACKAGES = (
    "torch", "diffusers", "accelerate", "transformers", "datasets", "numpy", "pillow", "scikit-learn", "torchmetrics",
)  # fmt: skip


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions
