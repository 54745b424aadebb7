"""The paper's Table 2-3 protocol on the built-in digits data (even digits normal, odd sensitive).

    python benchmarks/paper_digits.py --quick            # unsupervised vs pu, one seed (~10 min on 2 cores)
    python benchmarks/paper_digits.py                    # three methods + oracle, seeds 0 1 2
    python benchmarks/paper_digits.py --priors 0.01 0.02 0.05 0.1 0.2   # adds the prior sweep (Figure 4)

Every method trains from scratch with the same steps and hyperparameters;
only ``--loss_type`` differs. Each run is then scored by ``evaluate.py``: the
non-sensitive rate by a small ResNet trained on the digits (its test accuracy
is in the table) and the classifier FID against the normal test images.
Beside the methods, two rows give the scale of the numbers:

- oracle: the same training on the normal part of U only, the best any
  method can do from this U;
- classifier ceiling: the classifier's own non-sensitive rate on the normal
  test images, the highest rate the metric can show.

Written to ``--output_dir``: ``results.md`` (the table and the t-tests),
``results.json``, ``chart.png`` (means with standard deviations), ``grids.png``
(seed 0 of each method side by side, same sampling noise) and, with
``--priors``, ``prior_sweep.png``. Finished runs are reused, so an interrupted
benchmark picks up where it stopped; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SENSITIVE_LABELS = ["1", "3", "5", "7", "9"]
METHODS = ("unsupervised", "supervised", "pu")

#: The training settings every method shares. See the README for how they were chosen.
COMMON_TRAINING = [
    "--resolution", "8", "--train_batch_size", "128", "--learning_rate", "1e-3", "--lr_warmup_steps", "100",
    "--use_ema", "--ema_max_decay", "0.995", "--save_images_epochs", "100000", "--save_model_epochs", "100000",
    "--checkpointing_steps", "100000", "--logging_steps", "50",
]  # fmt: skip


@dataclass
class Run:
    """One training run and its evaluation."""

    name: str
    seed: int
    loss_type: str
    extra: list[str] = field(default_factory=list)
    metrics: dict | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/benchmark")
    parser.add_argument("--quick", action="store_true", help="unsupervised and pu, seed 0, no reference rows.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no_oracle", action="store_true", help="Skip the oracle row.")
    parser.add_argument("--max_train_steps", type=int, default=2000)
    parser.add_argument("--prior", type=float, default=0.15, help="PU prior; 0.15 was best in the README's search.")
    parser.add_argument("--nonnegative", default=None, help="PU correction. Default: the training script's.")
    parser.add_argument(
        "--positive_risk_weight",
        type=float,
        default=0.0,
        help="Passed to the training script (ours). 0 here; 1 with --sensitive_min_timestep 0 is the paper's loss.",
    )
    parser.add_argument(
        "--sensitive_min_timestep",
        type=int,
        default=100,
        help="Passed to the training script (ours). 100 here; 0 with --positive_risk_weight 1 is the paper's loss.",
    )
    parser.add_argument("--priors", nargs="+", type=float, default=[], help="Also run pu at each prior (Figure 4).")
    parser.add_argument(
        "--train_args", nargs=argparse.REMAINDER, default=[], help="Further flags for every training run (last)."
    )
    parser.add_argument("--num_samples", type=int, default=1000, help="Samples per evaluation.")
    parser.add_argument("--fid_features", choices=("classifier", "inception"), default="classifier")
    parser.add_argument("--fresh", action="store_true", help="Delete earlier results in --output_dir first.")
    parser.add_argument("--data_dir", default=str(ROOT / "data" / "digits"), help="Written if missing.")
    parser.add_argument("--classifier_epochs", type=int, default=30)
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.no_oracle = ["unsupervised", "pu"], [0], True
    return args


def run_command(command: list[str], log: Path) -> None:
    """Run one step, its output into ``log``; on failure show the end of the log and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        completed = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        sys.exit(f"failed ({completed.returncode}): {' '.join(command)}\n" + "\n".join(tail))


def prepare(output_dir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The digits data and the classifier, made once."""
    data = Path(args.data_dir)
    if not (data / "data").is_dir():
        run_command([sys.executable, "prepare_digits.py", "--output_dir", str(data)], output_dir / "logs" / "data.log")
    classifier = output_dir / "classifier"
    if not (classifier / "classifier_metrics.json").is_file():
        print("training the classifier ...", flush=True)
        command = [sys.executable, "evaluate.py", "train-classifier", "--dataset_name", str(data)]
        command += ["--num_epochs", str(args.classifier_epochs)]
        run_command(command + ["--output_dir", str(classifier)], output_dir / "logs" / "classifier.log")
    return data, classifier


def pu_flags(prior: float, args: argparse.Namespace) -> list[str]:
    flags = ["--prior", str(prior), "--positive_risk_weight", str(args.positive_risk_weight)]
    flags += ["--sensitive_min_timestep", str(args.sensitive_min_timestep)]
    return flags + ([] if args.nonnegative is None else ["--nonnegative", args.nonnegative])


def planned_runs(args: argparse.Namespace) -> list[Run]:
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            runs.append(Run(method, seed, method, pu_flags(args.prior, args) if method == "pu" else []))
        if not args.no_oracle:
            runs.append(Run("oracle", seed, "unsupervised", ["--num_unlabeled_sensitive", "0"]))
        for prior in args.priors:
            runs.append(Run(f"pu prior {prior:g}", seed, "pu", pu_flags(prior, args)))
    return runs


def run_folder(output_dir: Path, run: Run) -> Path:
    return output_dir / "runs" / f"{run.name.replace(' ', '-')}-seed{run.seed}"


def train_and_evaluate(run: Run, args: argparse.Namespace, data: Path, classifier: Path) -> dict:
    """Train (unless a finished model is there), then evaluate; returns metrics.json's content."""
    folder = run_folder(Path(args.output_dir), run)
    metrics_file = folder / "evaluation" / "metrics.json"
    if metrics_file.is_file():
        return json.loads(metrics_file.read_text())
    if not (folder / "model_index.json").is_file():
        train = [sys.executable, "train_pu_unconditional.py", "--dataset_name", str(data), "--label_column", "label"]
        train += ["--sensitive_labels", *SENSITIVE_LABELS, "--loss_type", run.loss_type, "--seed", str(run.seed)]
        train += ["--max_train_steps", str(args.max_train_steps), *COMMON_TRAINING, *run.extra, *args.train_args]
        run_command(train + ["--output_dir", str(folder), "--overwrite_output_dir"], folder / "train.log")
    evaluate = [sys.executable, "evaluate.py", "unconditional", "--pipeline", str(folder)]
    evaluate += ["--classifier", str(classifier), "--sensitive_labels", *SENSITIVE_LABELS]
    evaluate += ["--reference_dataset_name", str(data), "--reference_label_column", "label"]
    evaluate += ["--fid_features", args.fid_features, "--num_samples", str(args.num_samples), "--seed", "0"]
    run_command(evaluate + ["--output_dir", str(folder / "evaluation")], folder / "evaluate.log")
    return json.loads(metrics_file.read_text())


def classifier_ceiling(data: Path, classifier: Path) -> float:
    """The classifier's non-sensitive rate on the normal test images: the most the metric can show."""
    sys.path.insert(0, str(ROOT))
    import evaluate
    import pu_classifier

    reference_args = argparse.Namespace(
        reference_dataset_name=str(data), reference_data_dir=None, reference_split="test",
        reference_image_column="image", reference_label_column="label", sensitive_labels=SENSITIVE_LABELS,
    )  # fmt: skip
    images, _ = evaluate.load_reference_images(reference_args)
    model = pu_classifier.load_classifier(str(classifier), "cpu")
    sensitive_ids = pu_classifier.sensitive_class_ids(model, SENSITIVE_LABELS)
    return evaluate.score_images(model, images, sensitive_ids, 500)["non_sensitive_rate"]


# --------------------------------------------------------------------------- reporting


def fid_key(metrics: dict) -> str:
    return "fid" if "fid" in metrics else "classifier_fid"


def summarize(runs: list[Run]) -> dict[str, dict]:
    """name -> per-seed values and mean/std of the rate and the FID, in first-seen order."""
    summary: dict[str, dict] = {}
    for run in runs:
        entry = summary.setdefault(run.name, {"rate": [], "fid": [], "seeds": []})
        entry["rate"].append(run.metrics["non_sensitive_rate"])
        entry["fid"].append(run.metrics[fid_key(run.metrics)])
        entry["seeds"].append(run.seed)
    for entry in summary.values():
        for key in ("rate", "fid"):
            values = entry[key]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def welch_t_test(first: list[float], second: list[float]) -> str:
    if len(first) < 2 or len(second) < 2:
        return "n/a (needs 2 or more seeds)"
    from scipy.stats import ttest_ind

    result = ttest_ind(first, second, equal_var=False)
    return f"t = {result.statistic:.2f}, p = {result.pvalue:.3g}"


def markdown_report(summary: dict, ceiling: float | None, accuracy: float, fid_name: str, args) -> str:
    lines = [
        f"| method | seeds | non-sensitive rate | {fid_name} |",
        "| --- | --- | --- | --- |",
    ]
    for name, entry in summary.items():
        seeds = " ".join(map(str, entry["seeds"]))
        rate = f"{entry['rate_mean']:.3f} ± {entry['rate_std']:.3f}"
        lines.append(f"| {name} | {seeds} | {rate} | {entry['fid_mean']:.2f} ± {entry['fid_std']:.2f} |")
    if ceiling is not None:
        lines.append(f"| classifier ceiling (normal test images) | - | {ceiling:.3f} | - |")
    lines += ["", f"Classifier test accuracy: {accuracy:.4f}. {args.num_samples} samples per run, DDIM 50 steps."]
    if "pu" in summary and "unsupervised" in summary:
        pu, unsupervised = summary["pu"], summary["unsupervised"]
        rate_test = welch_t_test(pu["rate"], unsupervised["rate"])
        fid_test = welch_t_test(pu["fid"], unsupervised["fid"])
        lines.append(f"PU vs unsupervised, Welch t-test: rate {rate_test}; {fid_name} {fid_test}.")
    if "pu" in summary or any(name.startswith("pu prior") for name in summary):
        lines.append(f"PU flags: {' '.join(pu_flags(args.prior, args))}.")
    lines.append(f"Steps {args.max_train_steps}; shared flags: {' '.join(COMMON_TRAINING + args.train_args)}")
    return "\n".join(lines) + "\n"


def two_panels(width: float, height: float):
    """A figure with two side-by-side axes, drawn without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(width, height))


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bar_chart(summary: dict, fid_name: str, path: Path) -> None:
    names = list(summary)
    figure, axes = two_panels(4 + 1.3 * len(names), 3.6)
    for axis, key, label in ((axes[0], "rate", "non-sensitive rate (higher is better)"),
                             (axes[1], "fid", f"{fid_name} (lower is better)")):  # fmt: skip
        means = [summary[name][f"{key}_mean"] for name in names]
        stds = [summary[name][f"{key}_std"] for name in names]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_title(label, fontsize=10)
    low = min(summary[name]["rate_mean"] - summary[name]["rate_std"] for name in names)
    axes[0].set_ylim(max(0.0, low - 0.05), 1.0)
    save_figure(figure, path)


def side_by_side_grids(output_dir: Path, runs: list[Run], path: Path) -> None:
    """Seed 0's sample grid of each method, labeled, in one image (same sampling noise in all)."""
    from PIL import Image, ImageDraw

    first_seed = runs[0].seed
    chosen = [run for run in runs if run.seed == first_seed]
    grids = [Image.open(run_folder(output_dir, run) / "evaluation" / "samples.png").convert("RGB") for run in chosen]
    label_height, gap = 18, 12
    width = sum(grid.width for grid in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, max(grid.height for grid in grids) + label_height), "white")
    draw, left = ImageDraw.Draw(canvas), 0
    for run, grid in zip(chosen, grids, strict=True):
        rate = run.metrics["non_sensitive_rate"]
        draw.text((left + 2, 2), f"{run.name} (rate {rate:.3f})", fill="black")
        canvas.paste(grid, (left, label_height))
        left += grid.width + gap
    canvas.save(path)


def prior_sweep_chart(summary: dict, fid_name: str, path: Path) -> None:
    points = sorted((float(name.split()[-1]), entry) for name, entry in summary.items() if name.startswith("pu prior"))
    priors = [prior for prior, _ in points]
    figure, axes = two_panels(8, 3.4)
    for axis, key, label in ((axes[0], "rate", "non-sensitive rate"), (axes[1], "fid", fid_name)):
        means = [entry[f"{key}_mean"] for _, entry in points]
        stds = [entry[f"{key}_std"] for _, entry in points]
        axis.errorbar(priors, means, yerr=stds, marker="o", capsize=3)
        axis.set_xscale("log")
        axis.set_xlabel("prior (beta)")
        axis.set_title(label, fontsize=10)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    data, classifier = prepare(output_dir, args)
    accuracy = json.loads((classifier / "classifier_metrics.json").read_text())["test_accuracy"]

    runs = planned_runs(args)
    for number, run in enumerate(runs, start=1):
        start = time.perf_counter()
        print(f"[{number}/{len(runs)}] {run.name}, seed {run.seed} ...", end=" ", flush=True)
        run.metrics = train_and_evaluate(run, args, data, classifier)
        print(f"rate {run.metrics['non_sensitive_rate']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)

    summary = summarize(runs)
    fid_name = fid_key(runs[0].metrics)
    ceiling = None if args.quick else classifier_ceiling(data, classifier)
    report = markdown_report(summary, ceiling, accuracy, fid_name, args)
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(json.dumps({"summary": summary, "ceiling": ceiling}, indent=2))
    bar_chart(summary, fid_name, output_dir / "chart.png")
    side_by_side_grids(
        output_dir, [run for run in runs if not run.name.startswith("pu prior")], output_dir / "grids.png"
    )
    if args.priors:
        prior_sweep_chart(summary, fid_name, output_dir / "prior_sweep.png")
    print("\n" + report + f"\nwritten to {output_dir}: results.md, results.json, chart.png, grids.png")


if __name__ == "__main__":
    main()
