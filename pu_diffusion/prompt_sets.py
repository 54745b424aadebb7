"""The prompts of ``evaluate.py text-to-image``: given on the command line, one per line of a text file, or
rows of a CSV with I2P's columns.

I2P (Schramowski et al., 2023, the ``AIML-TUDA/i2p`` dataset on the Hub) and
the adversarial prompt sets built on it (Ring-A-Bell, UnlearnDiffAtk) give
each prompt the seed and guidance scale its reference image was made with
(``sd_seed``, ``sd_guidance_scale``) and the categories it belongs to
(``categories``, comma-separated: "sexual, violence"). A CSV's rows keep
them: each prompt is drawn with its own seed and guidance, as those
benchmarks draw it, and the rates are reported per category.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from pu_diffusion.errors import InputError, read_text

#: I2P's columns that the evaluation reads; every other column is ignored.
PROMPT_COLUMN, SEED_COLUMN, GUIDANCE_COLUMN, CATEGORIES_COLUMN = "prompt", "sd_seed", "sd_guidance_scale", "categories"


@dataclass(frozen=True)
class Prompt:
    """A prompt, and what its row fixes: the seed of its first batch, its guidance scale, its categories."""

    text: str
    seed: int | None = None
    guidance_scale: float | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)

    def guidance_or(self, default: float) -> float:
        """Its row's guidance scale, else ``default`` (--guidance_scale)."""
        return default if self.guidance_scale is None else self.guidance_scale


def read_prompt_file(path: str) -> list[Prompt]:
    """--prompt_file: a CSV (``.csv``) with a ``prompt`` column, or plain text with one prompt per line."""
    text = read_text(path, "--prompt_file")
    prompts = read_prompt_csv(text, path) if path.lower().endswith(".csv") else plain_prompts(text)
    if not prompts:
        raise InputError(f"--prompt_file {path} holds no prompt")
    return prompts


def plain_prompts(text: str) -> list[Prompt]:
    return [Prompt(line.strip()) for line in text.splitlines() if line.strip()]


def read_prompt_csv(text: str, path: str) -> list[Prompt]:
    """Rows with a non-empty prompt; ``sd_seed``, ``sd_guidance_scale`` and ``categories`` where present."""
    reader = csv.DictReader(io.StringIO(text))
    if PROMPT_COLUMN not in (reader.fieldnames or []):
        raise InputError(f"--prompt_file {path}: a CSV needs a {PROMPT_COLUMN!r} column; it has {reader.fieldnames}")
    prompts = []
    for line, row in enumerate(reader, start=2):
        if not (row[PROMPT_COLUMN] or "").strip():
            continue
        prompts.append(
            Prompt(
                row[PROMPT_COLUMN].strip(),
                _number(row.get(SEED_COLUMN), int, path, line, SEED_COLUMN),
                _number(row.get(GUIDANCE_COLUMN), float, path, line, GUIDANCE_COLUMN),
                tuple(part.strip() for part in (row.get(CATEGORIES_COLUMN) or "").split(",") if part.strip()),
            )
        )
    return prompts


def _number(cell: str | None, kind, path: str, line: int, column: str):
    """The cell as ``kind``, None when it is empty or the column is missing; an error naming file, line, column."""
    if cell is None or not cell.strip():
        return None
    try:
        value = float(cell)
        if kind is int and not value.is_integer():
            raise ValueError
        value = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise InputError(f"--prompt_file {path}, line {line}: {column} {cell!r} is not {what}") from None
    if value < 0:
        raise InputError(f"--prompt_file {path}, line {line}: {column} {cell!r} is negative")
    return value


def prompt_groups(prompts: list[Prompt]) -> dict[str, list[int]]:
    """The groups the rates are reported for: "all" prompts, then each category (by name) with its prompts'
    indices. A prompt in two categories counts in both."""
    groups = {"all": list(range(len(prompts)))}
    for category in sorted({category for prompt in prompts for category in prompt.categories}):
        groups[category] = [index for index, prompt in enumerate(prompts) if category in prompt.categories]
    return groups
