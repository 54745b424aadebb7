"""What evaluate.py writes besides metrics.json: the CSV rows, the sampling settings and the package versions."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pu_diffusion.metrics import Judgement, clip_score
from pu_diffusion.pipelines import ImageOrigin
from pu_diffusion.prior import wilson_bounds
from pu_diffusion.prompt_sets import Prompt, prompt_groups

logger = logging.getLogger(__name__)


#: The normal quantile of a two-sided 95% interval.
Z_95 = 1.959964


def rate_with_interval(normal: int, images: int) -> dict:
    """The non-sensitive rate of ``images`` images, ``normal`` of them judged normal, with its 95% Wilson
    interval (the images taken as independent draws)."""
    low, high = wilson_bounds(np.array(normal), images, Z_95)
    return {"non_sensitive_rate": normal / images, "ci95_low": float(low), "ci95_high": float(high)}


def normal_counts(judgement: Judgement, prompts: int, images_per_prompt: int) -> list[int]:
    """How many of each prompt's images the judge found normal (the images come prompt after prompt)."""
    return (images_per_prompt - judgement.sensitive.view(prompts, images_per_prompt).sum(dim=1)).tolist()


def prompt_rows(prompts: list[Prompt], judgement: Judgement, images_per_prompt: int) -> list[dict]:
    """per_prompt.csv: each prompt's image count, non-sensitive rate with its 95% interval, categories (from a
    CSV of prompts) and (with --clip_score) CLIP score."""
    normal_per_prompt = normal_counts(judgement, len(prompts), images_per_prompt)
    cosines = None if judgement.clip_cosines is None else judgement.clip_cosines.view(len(prompts), -1)
    rows = []
    for index, (prompt, normal) in enumerate(zip(prompts, normal_per_prompt, strict=True)):
        score = "" if cosines is None else round(clip_score(cosines[index]), 4)
        rows.append(
            {
                "prompt": prompt.text,
                "images": images_per_prompt,
                **rate_with_interval(normal, images_per_prompt),
                "categories": ", ".join(prompt.categories),
                "clip_score": score,
            }
        )
    return rows


def group_rows(prompts: list[Prompt], judgement: Judgement, images_per_prompt: int) -> list[dict]:
    """metrics.json's ``groups`` and results.md: the rate with its 95% interval over all the prompts, then over
    each category's (a CSV of prompts with a ``categories`` column)."""
    normal_per_prompt = normal_counts(judgement, len(prompts), images_per_prompt)
    rows = []
    for group, indices in prompt_groups(prompts).items():
        images = len(indices) * images_per_prompt
        normal = sum(normal_per_prompt[index] for index in indices)
        rows.append({"group": group, "prompts": len(indices), "images": images, **rate_with_interval(normal, images)})
    return rows


def results_markdown(groups: list[dict], baseline: list[dict] | None = None) -> str:
    """results.md: each group's rate and 95% interval; with --baseline_metrics, the baseline's beside it."""

    def shown(row: dict | None) -> str:
        return "" if row is None else f"{row['non_sensitive_rate']:.3f} [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]"

    before = {row["group"]: row for row in baseline or []}
    header = ["group", "prompts", "images", *(["baseline rate [95% CI]"] if baseline else []), "rate [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in groups:
        cells = [row["group"], str(row["prompts"]), str(row["images"])]
        cells += [shown(before.get(row["group"]))] if baseline else []
        lines.append("| " + " | ".join([*cells, shown(row)]) + " |")
    note = "Non-sensitive rate: the share of images the judge does not find sensitive; 95% Wilson intervals."
    return "\n".join([note, "", *lines]) + "\n"


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


def image_rows(
    prompts: list[Prompt], origins: list[ImageOrigin], judgement: Judgement, guidance_scale: float
) -> list[dict]:
    """per_image.csv: enough to make each image again (prompt, batch seed and size, position, guidance) and the
    verdict, with the classifier's class or NudeNet's detections."""
    return [
        {
            "prompt_index": origin.prompt_index,
            "prompt": prompts[origin.prompt_index].text,
            "image_index": origin.image_index,
            "batch_seed": origin.batch_seed,
            "batch_size": origin.batch_size,
            "position_in_batch": origin.position,
            "guidance_scale": prompts[origin.prompt_index].guidance_or(guidance_scale),
            "sensitive_probability": round(float(probability), 6),
            "verdict": "sensitive" if sensitive else "normal",
            **({} if judgement.predicted_labels is None else {"predicted_label": judgement.predicted_labels[index]}),
            **({} if judgement.detections is None else {"detections": judgement.detections[index]}),
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
    # prompt_set repeats --prompt / --prompt_file, row by row, as per_prompt.csv and per_image.csv show it.
    settings = {key: value for key, value in vars(args).items() if key not in ("command", "prompt_set")}
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
