"""The paper's Stable Diffusion experiment, scaled to a CPU: fine-tune a small text-to-image model with each
method, LoRA and full, and judge what it draws for a prompt that names no shape.

    python benchmarks/text_to_image_protocol.py --quick     # LoRA, seed 0, unsupervised against pu
    python benchmarks/text_to_image_protocol.py             # every method and the oracle, LoRA and full, seeds 0 1 2

The authors' code fine-tunes Stable Diffusion 1.4 on U = 64 normal and 16
sensitive images under one caption (a true share of 0.2) with S = 20 other
sensitive images. Here the model is the small Stable Diffusion pipeline that
prepare_text_to_image_base.py trains on the captioned shapes (made once and
reused), and U and S come from new shapes (another seed) all captioned "a
photo of a shape": 64 circles, squares and crosses and 16 triangles, stars
and rings in U, 20 others of the sensitive shapes in S. Every method trains
with the same steps and hyperparameters; only the loss differs, as in
paper_protocol.py: unsupervised, supervised, pu (the text-to-image script's
defaults), pu-paper (--paper_loss) and the oracle (U's normal part only);
--priors adds pu rows at other --prior values; --sensitive_shapes picks
other sensitive shapes (a second setup). Every run drops a tenth of
its captions, as the base did, so that classifier-free guidance (scale 5
in every evaluation) keeps working.

Each model is scored by evaluate.py text-to-image with the shapes classifier
(trained once by evaluate.py train-classifier on the captioned shapes):

- rate: the non-sensitive rate on "a photo of a shape", the prompt U was
  trained under, and the classifier FID of its images against the normal
  test shapes;
- paraphrases: the rate on three prompts no training caption uses;
- normal accuracy: how often "a photo of a circle / square / cross" gives
  the named shape (the normal concepts must survive).

The base model is scored the same way (row "base"). Written to --output_dir:
results.md, results.json, chart.png and grids.png (seed 0's images of each
method, a row per prompt). Finished runs are reused; --jobs N trains N at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from paper_protocol import (
    Run,
    made_by,
    record_made_by,
    run_all,
    run_command,
    run_folder,
    run_until_stopped,
    save_figure,
    thread_environment,
    train_classifier_once,
    welch_t_test,
)

from pu_diffusion.flags import (
    NON_NEGATIVE_FLOAT,
    OPEN_UNIT_INTERVAL,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    UNIT_INTERVAL,
    show_ranges,
)
from pu_diffusion.outputs import finished_model_file
from pu_diffusion.shapes import GENERIC_CAPTION, PARAPHRASES, SENSITIVE_SHAPES, SHAPES

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("unsupervised", "supervised", "pu", "pu-paper", "oracle")
MODES = ("lora", "full")


def normal_prompts(sensitive_shapes) -> tuple[str, ...]:
    """'a photo of a {shape}' for every shape that is not sensitive: the prompts whose accuracy must survive."""
    return tuple(f"a photo of a {shape}" for shape in SHAPES if shape not in sensitive_shapes)


NORMAL_PROMPTS = normal_prompts(SENSITIVE_SHAPES)
#: The authors' split: U = 64 normal + 16 sensitive (a share of 0.2), S = 20 other sensitive images.
SPLIT_COUNTS = {"num_unlabeled_normal": 64, "num_unlabeled_sensitive": 16, "num_labeled_sensitive": 20}
SPLIT = [part for name, count in SPLIT_COUNTS.items() for part in (f"--{name}", str(count))]
#: Classifier-free guidance of every evaluation: the lowest scale at which the base draws each named shape at
#: least 90% of the time (0.95-1.00 at 5; square 0.88 at 3; 0.66-0.88 at 1; docs/benchmark.md).
GUIDANCE_SCALE = 5.0
#: The evaluation's sampling, but for the guidance scale.
SAMPLING = ["--num_inference_steps", "30", "--batch_size", "100", "--seed", "0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "benchmark-text-to-image"))
    parser.add_argument("--base_dir", default=str(ROOT / "outputs" / "shapes-sd"), help="The base; made if missing.")
    parser.add_argument("--data_root", default=str(ROOT / "data"), help="The datasets are written here if missing.")
    parser.add_argument("--quick", action="store_true", help="LoRA, seed 0, unsupervised and pu only.")
    parser.add_argument(
        "--sensitive_shapes",
        nargs="+",
        choices=SHAPES,
        default=list(SENSITIVE_SHAPES),
        help="The sensitive shapes (default: triangle star ring); another choice is a second setup that the"
        " defaults were not chosen on. Use another --output_dir for it.",
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--priors",
        nargs="+",
        type=OPEN_UNIT_INTERVAL,
        default=[],
        help="Also run pu at each of these --prior values (rows MODE-pu-prior-P); U's true share is 0.2.",
    )
    parser.add_argument("--max_train_steps", type=POSITIVE_INT, default=400, help="Fine-tuning steps of every run.")
    parser.add_argument("--train_batch_size", type=POSITIVE_INT, default=16, help="U images per step (the authors').")
    parser.add_argument("--lora_learning_rate", type=POSITIVE_FLOAT, default=1e-3)
    parser.add_argument("--full_learning_rate", type=POSITIVE_FLOAT, default=1e-4)
    parser.add_argument("--lora_rank", type=POSITIVE_INT, default=8)
    parser.add_argument(
        "--caption_dropout_rate",
        type=UNIT_INTERVAL,
        default=0.1,
        help="Every run's caption dropout, as the base's, so that guidance keeps working after fine-tuning.",
    )
    parser.add_argument(
        "--guidance_scale", type=NON_NEGATIVE_FLOAT, default=GUIDANCE_SCALE, help="The evaluation's guidance."
    )
    parser.add_argument("--images_per_prompt", type=POSITIVE_INT, default=120, help="Images of each prompt.")
    parser.add_argument("--classifier_epochs", type=POSITIVE_INT, default=15)
    parser.add_argument(
        "--allow_weak_classifier", action="store_true", help="Score even with a classifier near chance (tests)."
    )
    parser.add_argument(
        "--train_args", nargs=argparse.REMAINDER, default=[], help="Further flags for every training run (last)."
    )
    parser.add_argument(
        "--jobs", type=POSITIVE_INT, default=1, help="Runs trained at once, each with its share of the CPU threads."
    )
    show_ranges(parser)
    args = parser.parse_args(argv)
    if not 0 < len(set(args.sensitive_shapes)) < len(SHAPES):
        parser.error("--sensitive_shapes: name at least one shape and leave at least one normal")
    if args.quick:
        args.methods, args.modes, args.seeds = ["unsupervised", "pu"], ["lora"], [0]
    return args


# --------------------------------------------------------------------------- what is made once


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(base pipeline, fine-tuning data, classifier), each made if missing."""
    output_dir = Path(args.output_dir)
    logs = output_dir / "logs"
    base_data = Path(args.data_root) / "shapes32-captioned"
    base = Path(args.base_dir)
    if not (base / "model_index.json").is_file():
        print(f"training the base model in {base} (about 30 minutes on 2 cores) ...", flush=True)
        command = [sys.executable, "prepare_text_to_image_base.py", "--output_dir", str(base)]
        run_command(command + ["--data_dir", str(base_data)], logs / "base.log")
    finetune_data = Path(args.data_root) / "shapes32-finetune"
    command = [sys.executable, "prepare_shapes.py", "--output_dir", str(finetune_data), "--resolution", "32"]
    command += ["--images_per_class", "100", "--seed", "1", "--captions", "--generic_caption_share", "1"]
    run_command(command, logs / "finetune_data.log")  # keeps a folder that holds the same dataset
    classifier = train_classifier_once(str(base_data), "label", args.classifier_epochs, output_dir)
    return base, finetune_data, classifier


# --------------------------------------------------------------------------- runs


def planned_runs(args: argparse.Namespace) -> list[Run]:
    runs = [Run("base", 0, "none")]
    for mode in args.modes:
        for seed in args.seeds:
            for method in args.methods:
                loss_type, extra = {
                    "pu-paper": ("pu", ["--paper_loss"]),
                    "oracle": ("unsupervised", ["--num_unlabeled_sensitive", "0"]),
                }.get(method, (method, []))
                runs.append(Run(f"{mode}-{method}", seed, loss_type, extra))
            for prior in args.priors:
                runs.append(Run(f"{mode}-pu-prior-{prior:g}", seed, "pu", ["--prior", str(prior)]))
    return runs


def training_command(run: Run, args: argparse.Namespace, base: Path, data: Path) -> list[str]:
    mode = run.name.split("-")[0]
    command = [sys.executable, "train_pu_text_to_image.py", "--pretrained_model_name_or_path", str(base)]
    command += ["--dataset_name", str(data), "--caption_column", "text", "--label_column", "label"]
    command += ["--sensitive_labels", *args.sensitive_shapes, *SPLIT]
    command += ["--loss_type", run.loss_type, "--seed", str(run.seed)]
    command += ["--resolution", "32", "--center_crop", "--cache_latents"]
    command += ["--train_batch_size", str(args.train_batch_size)]
    command += ["--max_train_steps", str(args.max_train_steps), "--lr_warmup_steps", "0", "--logging_steps", "50"]
    command += ["--checkpointing_steps", "100000", "--caption_dropout_rate", str(args.caption_dropout_rate)]
    if mode == "lora":
        command += ["--use_lora", "--rank", str(args.lora_rank), "--learning_rate", str(args.lora_learning_rate)]
    else:
        command += ["--learning_rate", str(args.full_learning_rate)]
    command += [*run.extra, *args.train_args]
    return command + ["--output_dir", str(run_folder(Path(args.output_dir), run)), "--overwrite_output_dir"]


def evaluation_command(run: Run, args: argparse.Namespace, base: Path, classifier: Path) -> list[str]:
    """evaluate.py text-to-image on the generic prompt, its paraphrases and the normal prompts, with each
    prompt's classifier FID against the normal test shapes."""
    folder = run_folder(Path(args.output_dir), run)
    if run.name == "base":
        model = ["--pipeline", str(base)]
    elif run.name.startswith("lora"):
        model = ["--pipeline", str(base), "--lora", str(folder)]
    else:
        model = ["--pipeline", str(folder)]
    command = [sys.executable, "evaluate.py", "text-to-image", *model, *SAMPLING]
    command += ["--guidance_scale", str(args.guidance_scale)]
    command += ["--prompt", GENERIC_CAPTION, *PARAPHRASES, *normal_prompts(args.sensitive_shapes)]
    command += ["--images_per_prompt", str(args.images_per_prompt), "--grid_images_per_prompt", "8"]
    command += ["--classifier", str(classifier), "--sensitive_labels", *args.sensitive_shapes]
    command += ["--allow_weak_classifier"] if args.allow_weak_classifier else []
    command += ["--reference_dataset_name", str(Path(args.data_root) / "shapes32-captioned")]
    command += ["--reference_label_column", "label", "--fid_features", "classifier"]
    return command + ["--output_dir", str(folder / "evaluation")]


def train_and_evaluate(run: Run, args: argparse.Namespace, base: Path, data: Path, classifier: Path) -> dict:
    """Train (unless this run's finished model is there with the same command), evaluate, and read the metrics."""
    folder = run_folder(Path(args.output_dir), run)
    environment = thread_environment(args.jobs)
    if run.name != "base":
        command = training_command(run, args, base, data)
        record = folder / "benchmark_run.json"
        if folder.exists() and not made_by(record, command):
            shutil.rmtree(folder)
        if not finished_model_file(str(folder)):
            run_command(command, folder / "train.log", environment)
            record_made_by(record, command)
    classifier_record = json.loads((classifier / "classifier_metrics.json").read_text())
    command = evaluation_command(run, args, base, classifier)
    evaluation, record = folder / "evaluation", folder / "benchmark_evaluation.json"
    if not ((evaluation / "metrics.json").is_file() and made_by(record, command, classifier=classifier_record)):
        shutil.rmtree(evaluation, ignore_errors=True)
        run_command(command, folder / "evaluate.log", environment)
        record_made_by(record, command, classifier=classifier_record)
    return scores(json.loads((evaluation / "metrics.json").read_text()), normal_prompts(args.sensitive_shapes))


def scores(metrics: dict, normal: tuple[str, ...] = NORMAL_PROMPTS) -> dict:
    """The run's numbers, from its metrics.json; ``normal`` are the prompts of the normal shapes."""
    prompts = {row["prompt"]: row for row in metrics["per_prompt"]}
    generic = prompts[GENERIC_CAPTION]
    accuracy = {}
    for prompt in normal:
        counts = prompts[prompt]["prediction_counts"]
        accuracy[prompt] = counts.get(prompt.rsplit(" ", 1)[1], 0) / sum(counts.values())
    return {
        "non_sensitive_rate": generic["non_sensitive_rate"],
        "classifier_fid": generic["classifier_fid"],
        "generic_prediction_counts": generic["prediction_counts"],
        "paraphrase_rate": statistics.fmean(prompts[prompt]["non_sensitive_rate"] for prompt in PARAPHRASES),
        "paraphrase_rates": {prompt: prompts[prompt]["non_sensitive_rate"] for prompt in PARAPHRASES},
        "normal_accuracy": statistics.fmean(accuracy.values()),
        "normal_accuracies": accuracy,
    }


# --------------------------------------------------------------------------- reporting

COLUMNS = ("non_sensitive_rate", "paraphrase_rate", "normal_accuracy", "classifier_fid")


def summarize(runs: list[Run]) -> dict[str, dict]:
    """Per row: each column's seed values, mean and standard deviation."""
    summary: dict[str, dict] = {}
    for run in runs:
        row = summary.setdefault(run.name, {column: [] for column in COLUMNS})
        for column in COLUMNS:
            row[column].append(run.metrics[column])
    for row in summary.values():
        for column in COLUMNS:
            values = row[column]
            row[f"{column}_mean"] = statistics.fmean(values)
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def goals(summary: dict, mode: str) -> list[str]:
    """The issue's goals for one mode, each with its numbers and whether it is met."""
    rows = {name.split("-", 1)[1]: row for name, row in summary.items() if name.startswith(mode + "-")}
    if "pu" not in rows or "unsupervised" not in rows:
        return []
    pu, unsupervised = rows["pu"], rows["unsupervised"]
    base = summary["base"]
    lines = []

    def check(text: str, met: bool) -> None:
        lines.append(f"| {mode} | {text} | {'yes' if met else '**no**'} |")

    if "oracle" in rows:
        oracle = rows["oracle"]["non_sensitive_rate_mean"]
        gap = oracle - pu["non_sensitive_rate_mean"]
        check(f"pu within 0.02 of the oracle's rate: {pu['non_sensitive_rate_mean']:.3f} vs {oracle:.3f}", gap <= 0.02)
        spread = oracle - unsupervised["non_sensitive_rate_mean"]
        check(f"unsupervised at least 0.1 below the oracle: {spread:.3f} below", spread >= 0.1)
    drop = base["normal_accuracy_mean"] - pu["normal_accuracy_mean"]
    check(
        f"normal accuracy within 0.02 of the base's: {pu['normal_accuracy_mean']:.3f} vs"
        f" {base['normal_accuracy_mean']:.3f}",
        drop <= 0.02,
    )
    ratio = pu["classifier_fid_mean"] / unsupervised["classifier_fid_mean"]
    check(f"classifier FID at most 1.15x unsupervised: {ratio:.2f}x", ratio <= 1.15)
    worst = min(pu["non_sensitive_rate"])
    floor = unsupervised["non_sensitive_rate_mean"]
    check(f"no seed below unsupervised: lowest pu {worst:.3f}, unsupervised mean {floor:.3f}", worst >= floor)
    return lines


def markdown_report(summary: dict, args: argparse.Namespace, classifier_accuracy: float) -> str:
    lines = [
        "| model | seeds | rate, generic prompt | rate, paraphrases | normal-prompt accuracy | classifier FID |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in summary.items():
        cells = [f"{row[f'{c}_mean']:.3f} ± {row[f'{c}_std']:.3f}" for c in COLUMNS[:3]]
        fid = f"{row['classifier_fid_mean']:.1f} ± {row['classifier_fid_std']:.1f}"
        lines.append(f"| {name} | {len(row['non_sensitive_rate'])} | {' | '.join(cells)} | {fid} |")
    lines += ["", "Welch t-tests on the generic prompt's rate:", ""]
    for mode in args.modes:
        pu = summary.get(f"{mode}-pu")
        for other in ("unsupervised", "oracle"):
            row = summary.get(f"{mode}-{other}")
            if pu and row:
                test = welch_t_test(pu["non_sensitive_rate"], row["non_sensitive_rate"])
                lines.append(f"- {mode}: pu against {other}: {test}")
    goal_lines = [line for mode in args.modes for line in goals(summary, mode)]
    if goal_lines:
        lines += ["", "| mode | goal | met |", "| --- | --- | --- |", *goal_lines]
    lines += [
        "",
        f"Shapes classifier test accuracy: {classifier_accuracy:.3f}. Fine-tuning: {args.max_train_steps} steps,"
        f" batch {args.train_batch_size}, LoRA rank {args.lora_rank} at lr {args.lora_learning_rate:g}, full at lr"
        f" {args.full_learning_rate:g}, caption dropout {args.caption_dropout_rate:g}; sampling: {' '.join(SAMPLING)}"
        f" --guidance_scale {args.guidance_scale:g}.",
    ]
    return "\n".join(lines)


def bar_chart(summary: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(args.modes), figsize=(5 * len(args.modes), 3.6), squeeze=False)
    for axis, mode in zip(axes[0], args.modes, strict=True):
        names = ["base", *(name for name in summary if name.startswith(f"{mode}-"))]
        means = [summary[name]["non_sensitive_rate_mean"] for name in names]
        errors = [summary[name]["non_sensitive_rate_std"] for name in names]
        axis.bar([name.removeprefix(f"{mode}-") for name in names], means, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_ylim(0, 1.05)
        axis.set_title(f"{mode}: non-sensitive rate, '{GENERIC_CAPTION}'")
        axis.tick_params(axis="x", rotation=30)
    save_figure(figure, path)


def side_by_side_grids(runs: list[Run], args: argparse.Namespace, path: Path) -> None:
    from PIL import Image, ImageDraw

    shown = [run for run in runs if run.seed == 0]
    grids = [Image.open(run_folder(Path(args.output_dir), run) / "evaluation" / "samples.png") for run in shown]
    width = max(grid.width for grid in grids)
    canvas = Image.new("RGB", (width + 130, sum(grid.height + 4 for grid in grids)), "white")
    top = 0
    for run, grid in zip(shown, grids, strict=True):
        ImageDraw.Draw(canvas).text((4, top + grid.height // 2), run.name, fill="black")
        canvas.paste(grid, (130, top))
        top += grid.height + 4
    canvas.save(path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    base, data, classifier = prepare(args)
    runs = planned_runs(args)
    run_all(runs, args.jobs, lambda run: train_and_evaluate(run, args, base, data, classifier))
    summary = summarize(runs)
    accuracy = json.loads((classifier / "classifier_metrics.json").read_text())["test_accuracy"]
    report = markdown_report(summary, args, accuracy)
    (output_dir / "results.md").write_text(report + "\n")
    (output_dir / "results.json").write_text(
        json.dumps({"summary": summary, "runs": [run.__dict__ for run in runs]}, indent=2)
    )
    bar_chart(summary, args, output_dir / "chart.png")
    side_by_side_grids(runs, args, output_dir / "grids.png")
    print("\n" + report)
    print(f"\n{len(runs)} rows in {time.perf_counter() - start:.0f} s; written to {output_dir}")


if __name__ == "__main__":
    run_until_stopped(main)
