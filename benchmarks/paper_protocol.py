"""The paper's protocol (its Tables 2-5) on a labeled dataset: the built-in digits or shapes, or yours.

    python benchmarks/paper_protocol.py --quick                 # digits: unsupervised vs pu, one seed (make demo)
    python benchmarks/paper_protocol.py --dataset shapes        # every method + oracle, seeds 0 1 2
    python benchmarks/paper_protocol.py --protocol finetune     # pretrain unsupervised, then fine-tune (Tables 4-5)
    python benchmarks/paper_protocol.py --dataset path/to/labeled --sensitive_labels cat --resolution 32

Every method trains with the same steps and hyperparameters; only the loss
differs: ``unsupervised`` (plain diffusion on U), ``supervised`` (all of U
taken as normal), ``pu`` (the training scripts' defaults, nothing added) and
``pu-paper`` (``--paper_loss``, the paper's Eq. (19) as written). Two more
train on U filtered first by ``estimate_prior.py --write_filtered_data``
(each seed's label split without its most S-like share, the same S):
``unsupervised-filtered`` and ``pu-filtered``. Each run is
scored by ``evaluate.py``: the non-sensitive rate by a small ResNet trained on
the dataset's labels (its test accuracy is in the table) and the classifier
FID against the normal test images. Beside the methods, two rows give the
scale of the numbers:

- oracle: the same training on the normal part of U only, the best any
  method can do from this U;
- classifier ceiling: the classifier's own non-sensitive rate on the normal
  test images, the highest rate the metric can show.

With ``--protocol finetune`` a model is first trained unsupervised on U for
``--pretrain_steps`` (its row is "pretrained"), and every method, the oracle
included, fine-tunes it for ``--max_train_steps``.

Written to ``--output_dir``: ``results.md`` (the table and the t-tests),
``results.json``, ``chart.png`` (means with standard deviations), ``grids.png``
(seed 0 of each method side by side, same sampling noise) and, with
``--priors``, ``prior_sweep.png``. Finished runs are reused, so an interrupted
benchmark picks up where it stopped; ``--fresh`` starts over. ``--jobs N``
trains N runs at once, each with 1/N of the cores: on a CPU, these small
models gain little from more than one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from pu_diffusion.flags import (
    NON_NEGATIVE_INT,
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    fraction_rule,
    prior_value,
    show_ranges,
)
from pu_diffusion.unlabeled_filter import RECORD_FILE, SENSITIVE_FOLDER, UNLABELED_FOLDER

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_METHODS = ("unsupervised", "supervised", "pu", "pu-paper")
METHODS = (*DEFAULT_METHODS, "unsupervised-filtered", "pu-filtered")


@dataclass(frozen=True)
class Dataset:
    """A built-in dataset: the script that writes it, its sensitive labels and its image size."""

    writer: str
    sensitive_labels: tuple[str, ...]
    resolution: int


DATASETS = {
    "digits": Dataset("prepare_digits.py", ("1", "3", "5", "7", "9"), 8),
    "shapes": Dataset("prepare_shapes.py", ("triangle", "star", "ring"), 16),
}

#: The training settings every method shares. The final validation grid uses 50 DDPM steps, not 1,000: it is
#: only a look at the model, and evaluate.py samples the scored images itself.
COMMON_TRAINING = [
    "--train_batch_size", "128", "--learning_rate", "1e-3", "--lr_warmup_steps", "100",
    "--use_ema", "--ema_max_decay", "0.995", "--save_images_epochs", "100000", "--save_model_epochs", "100000",
    "--checkpointing_steps", "100000", "--logging_steps", "50", "--ddpm_num_inference_steps", "50",
]  # fmt: skip


@dataclass
class Run:
    """One training run and its evaluation."""

    name: str
    seed: int
    loss_type: str
    extra: list[str] = field(default_factory=list)
    metrics: dict | None = None
    filtered: bool = False  # trains on the seed's filtered U (and S) instead of the label split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="digits, shapes, or a labeled dataset (folder or Hub id).")
    parser.add_argument("--label_column", default="label", help="With a dataset of yours: its label column.")
    parser.add_argument("--sensitive_labels", nargs="+", default=None, help="Default: the built-in dataset's.")
    parser.add_argument(
        "--resolution", type=POSITIVE_INT, default=None, help="Default: the built-in dataset's (8 or 16)."
    )
    parser.add_argument("--output_dir", default=None, help="Default: outputs/benchmark-DATASET[-finetune].")
    parser.add_argument("--protocol", choices=("scratch", "finetune"), default="scratch")
    parser.add_argument("--quick", action="store_true", help="unsupervised and pu, seed 0, no reference rows.")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no_oracle", action="store_true", help="Skip the oracle row.")
    parser.add_argument(
        "--max_train_steps", type=POSITIVE_INT, default=2000, help="Steps of each method (of fine-tuning)."
    )
    parser.add_argument("--pretrain_steps", type=POSITIVE_INT, default=2000, help="With --protocol finetune.")
    parser.add_argument(
        "--prior", type=prior_value, default=None, help="PU prior for pu; default: the training script's."
    )
    parser.add_argument(
        "--priors", nargs="+", type=OPEN_UNIT_INTERVAL, default=[], help="Also run pu at each prior (Figure 4)."
    )
    parser.add_argument(
        "--num_unlabeled_sensitive",
        type=NON_NEGATIVE_INT,
        default=None,
        help="Sensitive images in U for every method (U's true share); the oracle keeps none. Default: the"
        " training script's (a tenth of U's normal images).",
    )
    parser.add_argument(
        "--num_labeled_sensitive",
        type=POSITIVE_INT,
        default=None,
        help="Images in S for every method. Default: the training script's (as many as U's sensitive ones).",
    )
    parser.add_argument(
        "--pu_args",
        type=shlex.split,
        default=[],
        help='Further flags for the pu rows only, as one string: --pu_args="--positive_risk_weight 1".',
    )
    parser.add_argument(
        "--train_args", nargs=argparse.REMAINDER, default=[], help="Further flags for every training run (last)."
    )
    parser.add_argument(
        "--filter_fraction",
        type=fraction_rule,
        default="high",
        help="The filtered methods' estimate_prior.py --filter_fraction: estimate, high or a share.",
    )
    parser.add_argument(
        "--filter_args",
        type=shlex.split,
        default=[],
        help='Further estimate_prior.py flags for the filtered methods, one string: --filter_args="--prior_folds 3".',
    )
    parser.add_argument("--num_samples", type=POSITIVE_INT, default=1000, help="Samples per evaluation.")
    parser.add_argument("--fid_features", choices=("classifier", "inception"), default="classifier")
    parser.add_argument("--fresh", action="store_true", help="Delete earlier results in --output_dir first.")
    parser.add_argument("--data_dir", default=None, help="A built-in dataset's folder; written if missing.")
    parser.add_argument("--classifier_epochs", type=POSITIVE_INT, default=30)
    parser.add_argument(
        "--jobs", type=POSITIVE_INT, default=1, help="Runs trained at once, each with its share of the CPU threads."
    )
    show_ranges(parser)
    args = parser.parse_args(argv)
    builtin = DATASETS.get(args.dataset)
    if builtin is None and (args.sensitive_labels is None or args.resolution is None):
        parser.error(f"--dataset {args.dataset}: a dataset of yours needs --sensitive_labels and --resolution")
    args.sensitive_labels = args.sensitive_labels or list(builtin.sensitive_labels)
    args.resolution = args.resolution or builtin.resolution
    if args.output_dir is None:
        name = args.dataset if builtin else Path(args.dataset).name
        args.output_dir = str(
            ROOT / "outputs" / f"benchmark-{name}{'-finetune' if args.protocol == 'finetune' else ''}"
        )
    if args.quick:
        args.methods, args.seeds, args.no_oracle = ["unsupervised", "pu"], [0], True
    return args


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) reached the benchmark or one of its runs: nothing more is started."""


#: Set once the benchmark is stopping; the runs in flight are told, and no queued one starts.
STOPPING = threading.Event()
RUNNING: set[subprocess.Popen] = set()
RUNNING_LOCK = threading.Lock()
#: Exit codes of a run stopped by SIGINT or SIGTERM (the scripts' own, and a child killed by the signal).
INTERRUPTED_CODES = {128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM}


def run_command(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one step, its output into ``log``; on failure show the end of the log and stop. An interrupted step
    stops the whole benchmark (:class:`Stopped`), so that no queued run starts after a Ctrl-C."""
    if STOPPING.is_set():
        raise Stopped(f"not started: {' '.join(command[1:3])}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as stream:
        process = subprocess.Popen(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT, env=env)
        with RUNNING_LOCK:
            RUNNING.add(process)
        try:
            returncode = process.wait()
        finally:
            with RUNNING_LOCK:
                RUNNING.discard(process)
    if returncode in INTERRUPTED_CODES or STOPPING.is_set():
        STOPPING.set()
        raise Stopped(f"interrupted: {' '.join(command)}")
    if returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        sys.exit(f"failed ({returncode}): {' '.join(command)}\n" + "\n".join(tail))


def stop_running_steps() -> None:
    """Ctrl-C in the benchmark: no queued run starts, and each step in flight gets SIGINT (which a terminal's
    Ctrl-C has already sent it; a SIGINT or SIGTERM sent to the benchmark alone reaches it only so)."""
    STOPPING.set()
    with RUNNING_LOCK:
        for process in RUNNING:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)


def prepare(output_dir: Path, args: argparse.Namespace) -> tuple[str, Path]:
    """The dataset (a built-in one is written if missing) and the classifier, made once."""
    builtin = DATASETS.get(args.dataset)
    data = args.dataset
    if builtin is not None:
        data = args.data_dir or str(ROOT / "data" / args.dataset)
        if not (Path(data) / "data").is_dir():
            command = [sys.executable, builtin.writer, "--output_dir", data]
            run_command(command, output_dir / "logs" / "data.log")
    return data, train_classifier_once(data, args.label_column, args.classifier_epochs, output_dir)


def train_classifier_once(data: str, label_column: str, epochs: int, output_dir: Path) -> Path:
    """``evaluate.py train-classifier`` into ``output_dir/classifier``, unless the one there was made by the
    same command."""
    classifier = output_dir / "classifier"
    command = [sys.executable, "evaluate.py", "train-classifier", "--dataset_name", data]
    command += ["--label_column", label_column, "--num_epochs", str(epochs), "--output_dir", str(classifier)]
    record = classifier / "benchmark_run.json"
    if classifier.exists() and not made_by(record, command):
        print("(classifier made with other flags: training it again)", flush=True)
        shutil.rmtree(classifier)
    if not (classifier / "classifier_metrics.json").is_file():
        print("training the classifier ...", flush=True)
        run_command(command, output_dir / "logs" / "classifier.log")
        record_made_by(record, command)
    return classifier


def made_by(record: Path, command: list[str], **more) -> bool:
    """Whether ``record`` says its folder was made by ``command`` (and ``more``), the interpreter aside: a
    result is reused only if everything that made it is the same."""
    return record.is_file() and json.loads(record.read_text()) == {"command": command[1:], **more}


def record_made_by(record: Path, command: list[str], **more) -> None:
    """What :func:`made_by` reads: the command without the interpreter's path, and ``more``."""
    record.write_text(json.dumps({"command": command[1:], **more}, indent=2))


def prior_flag(prior) -> list[str]:
    return ["--prior", str(prior)] if prior is not None else []


def pu_flags(prior, args: argparse.Namespace) -> list[str]:
    """The pu rows' flags: none beyond the scripts' defaults unless asked for."""
    return prior_flag(prior) + list(args.pu_args)


def planned_runs(args: argparse.Namespace) -> list[Run]:
    runs = []
    for seed in args.seeds:
        if args.protocol == "finetune":
            runs.append(Run("pretrained", seed, "unsupervised"))
        for method in args.methods:
            if method == "pu":
                runs.append(Run(method, seed, "pu", pu_flags(args.prior, args)))
            elif method == "pu-paper":
                runs.append(Run(method, seed, "pu", prior_flag(args.prior) + ["--paper_loss"]))
            elif method == "pu-filtered":
                runs.append(Run(method, seed, "pu", pu_flags(args.prior, args), filtered=True))
            elif method == "unsupervised-filtered":
                runs.append(Run(method, seed, "unsupervised", filtered=True))
            else:
                runs.append(Run(method, seed, method))
        if not args.no_oracle:
            runs.append(Run("oracle", seed, "unsupervised", ["--num_unlabeled_sensitive", "0"]))
        for prior in args.priors:
            runs.append(Run(f"pu prior {prior:g}", seed, "pu", pu_flags(prior, args)))
    return runs


def thread_environment(jobs: int) -> dict[str, str]:
    """The environment of a run when ``jobs`` runs share the machine: each gets its share of the cores, since
    torch's threads of two runs otherwise spin on each other (an OMP_NUM_THREADS of the user's is kept)."""
    environment = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in environment:
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return environment


def waves(runs: list[Run]) -> list[list[Run]]:
    """The runs in the order they can go: every fine-tuning run starts from its seed's pretrained model."""
    pretrained = [run for run in runs if run.name == "pretrained"]
    return [wave for wave in (pretrained, [run for run in runs if run.name != "pretrained"]) if wave]


def run_all(runs: list[Run], jobs: int, train_and_score: Callable[[Run], dict]) -> None:
    """Fill each run's metrics, ``jobs`` runs at a time, printing each result as it comes."""
    finished = 0
    for wave in waves(runs):
        print(f"{len(wave)} runs, {min(jobs, len(wave))} at a time ...", flush=True)
        pool = ThreadPoolExecutor(max_workers=jobs)
        started = {pool.submit(timed, train_and_score, run): run for run in wave}
        try:
            wait_for(started, runs, finished)
            finished += len(wave)
        except KeyboardInterrupt:
            stop_running_steps()
            raise
        finally:
            # After a failed or interrupted run, the queued runs are dropped; the ones in flight end first.
            pool.shutdown(cancel_futures=True)


def wait_for(started: dict, runs: list[Run], finished: int) -> None:
    """Collect the runs of one wave as they finish, printing each result."""
    for future in as_completed(started):
        run = started[future]
        run.metrics, seconds = future.result()
        finished += 1
        rate = run.metrics["non_sensitive_rate"]
        print(f"[{finished}/{len(runs)}] {run.name}, seed {run.seed}: rate {rate:.3f} ({seconds:.0f} s)", flush=True)


def timed(function: Callable[[Run], dict], run: Run) -> tuple[dict, float]:
    start = time.perf_counter()
    return function(run), time.perf_counter() - start


def run_folder(output_dir: Path, run: Run) -> Path:
    return output_dir / "runs" / f"{run.name.replace(' ', '-')}-seed{run.seed}"


def split_flags(args: argparse.Namespace) -> list[str]:
    """The label split's sizes that were given; they come before a run's own flags, so that the oracle's U
    stays without sensitive images."""
    sizes = {
        "--num_unlabeled_sensitive": args.num_unlabeled_sensitive,
        "--num_labeled_sensitive": args.num_labeled_sensitive,
    }
    return [part for flag, size in sizes.items() if size is not None for part in (flag, str(size))]


def label_split_flags(args: argparse.Namespace, data: str) -> list[str]:
    command = ["--dataset_name", data, "--label_column", args.label_column]
    return command + ["--sensitive_labels", *args.sensitive_labels, "--resolution", str(args.resolution)]


def filtered_data_folder(output_dir: Path, seed: int) -> Path:
    """The seed's filter step: its log, record and prior.json, and the written data in ``data/``."""
    return output_dir / "filtered" / f"seed{seed}"


def filtered_data(output_dir: Path, seed: int) -> Path:
    """What ``estimate_prior.py --write_filtered_data`` wrote for the seed: filtered U, S and filter.json."""
    return filtered_data_folder(output_dir, seed) / "data"


def filter_command(args: argparse.Namespace, data: str, seed: int) -> list[str]:
    """estimate_prior.py on the seed's label split, writing U without its most S-like share, and S."""
    folder = filtered_data_folder(Path(args.output_dir), seed)
    command = [sys.executable, "estimate_prior.py", *label_split_flags(args, data), "--seed", str(seed)]
    command += [*split_flags(args), "--output_dir", str(folder), "--filter_fraction", str(args.filter_fraction)]
    command += ["--write_filtered_data", str(filtered_data(Path(args.output_dir), seed)), "--overwrite_filtered_data"]
    return command + list(args.filter_args)


#: One lock per seed: the filtered methods of a seed share its filtered data, written once.
FILTER_LOCKS: dict[int, threading.Lock] = {}
FILTER_LOCKS_LOCK = threading.Lock()


def filter_once(args: argparse.Namespace, data: str, seed: int) -> None:
    """Write the seed's filtered data (:func:`filtered_data`) unless the folder there was made by the same
    command."""
    with FILTER_LOCKS_LOCK:
        lock = FILTER_LOCKS.setdefault(seed, threading.Lock())
    folder = filtered_data_folder(Path(args.output_dir), seed)
    command = filter_command(args, data, seed)
    record = folder / "benchmark_run.json"
    with lock:
        if not made_by(record, command):
            shutil.rmtree(folder, ignore_errors=True)
            run_command(command, folder / "filter.log", thread_environment(args.jobs))
            record_made_by(record, command)


def training_command(run: Run, args: argparse.Namespace, data: str, folder: Path) -> list[str]:
    """train_pu_unconditional.py for one run; under --protocol finetune every row but "pretrained" starts
    from that seed's pretrained model. A filtered run reads its seed's filtered U and S instead of the split."""
    command = [sys.executable, "train_pu_unconditional.py"]
    if run.filtered:
        filtered = filtered_data(Path(args.output_dir), run.seed)
        command += ["--dataset_name", str(filtered / UNLABELED_FOLDER), "--resolution", str(args.resolution)]
        if run.loss_type != "unsupervised":
            command += ["--sensitive_dataset_name", str(filtered / SENSITIVE_FOLDER)]
    else:
        command += label_split_flags(args, data)
    command += ["--loss_type", run.loss_type, "--seed", str(run.seed)]
    steps = args.max_train_steps
    if args.protocol == "finetune":
        if run.name == "pretrained":
            steps = args.pretrain_steps
        else:
            pretrained = run_folder(Path(args.output_dir), Run("pretrained", run.seed, "unsupervised"))
            command += ["--pretrained_model_name_or_path", str(pretrained)]
    split = [] if run.filtered else split_flags(args)
    command += ["--max_train_steps", str(steps), *COMMON_TRAINING, *split, *run.extra, *args.train_args]
    return command + ["--output_dir", str(folder), "--overwrite_output_dir"]


def train_and_evaluate(run: Run, args: argparse.Namespace, data: str, classifier: Path) -> dict:
    """Train (unless this run's finished model is there), then evaluate; returns metrics.json's content.

    A run folder is reused only if ``benchmark_run.json`` records the same
    training command: results of other flags or of an older version of the
    scripts' defaults are trained again, not reported under a new name.
    """
    folder = run_folder(Path(args.output_dir), run)
    if run.filtered:
        filter_once(args, data, run.seed)
    command = training_command(run, args, data, folder)
    record = folder / "benchmark_run.json"
    if folder.exists() and not made_by(record, command):
        print("(made with other flags: training again)", end=" ", flush=True)
        shutil.rmtree(folder)
    evaluation = folder / "evaluation"
    evaluate = [sys.executable, "evaluate.py", "unconditional", "--pipeline", str(folder)]
    evaluate += ["--classifier", str(classifier), "--sensitive_labels", *args.sensitive_labels]
    evaluate += ["--reference_dataset_name", data, "--reference_label_column", args.label_column]
    evaluate += ["--fid_features", args.fid_features, "--num_samples", str(args.num_samples), "--seed", "0"]
    evaluate += ["--output_dir", str(evaluation)]
    # The classifier's record (epochs, seed, accuracy) is part of what made the numbers.
    classifier_record = json.loads((classifier / "classifier_metrics.json").read_text())
    evaluation_record = evaluation / "benchmark_evaluation.json"
    metrics_file = evaluation / "metrics.json"
    if metrics_file.is_file() and made_by(evaluation_record, evaluate, classifier=classifier_record):
        return json.loads(metrics_file.read_text())
    environment = thread_environment(args.jobs)
    if not (folder / "model_index.json").is_file():
        run_command(command, folder / "train.log", environment)
        record_made_by(record, command)
    shutil.rmtree(evaluation, ignore_errors=True)
    run_command(evaluate, folder / "evaluate.log", environment)
    record_made_by(evaluation_record, evaluate, classifier=classifier_record)
    return json.loads(metrics_file.read_text())


def classifier_ceiling(data: str, classifier: Path, args: argparse.Namespace) -> float:
    """The classifier's non-sensitive rate on the normal test images: the most the metric can show."""
    from pu_diffusion.classifier import load_classifier, sensitive_class_ids
    from pu_diffusion.metrics import load_reference_images, score_images

    reference_args = argparse.Namespace(
        reference_dataset_name=data, reference_data_dir=None, reference_split="test",
        reference_image_column="image", reference_label_column=args.label_column,
        sensitive_labels=args.sensitive_labels,
    )  # fmt: skip
    images, _ = load_reference_images(reference_args)
    model = load_classifier(str(classifier), "cpu")
    sensitive_ids = sensitive_class_ids(model, args.sensitive_labels)
    return score_images(model, images, sensitive_ids, 500)["non_sensitive_rate"]


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


def markdown_report(
    summary: dict,
    ceiling: float | None,
    accuracy: float,
    fid_name: str,
    args,
    priors: list[float] = (),
    filters: dict[int, dict] | None = None,
) -> str:
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
    lines += [
        "",
        f"Dataset {args.dataset} at {args.resolution} px, sensitive labels {' '.join(args.sensitive_labels)}.",
    ]
    lines.append(f"Classifier test accuracy: {accuracy:.4f}. {args.num_samples} samples per run, DDIM 50 steps.")
    if "pu" in summary and "unsupervised" in summary:
        pu, unsupervised = summary["pu"], summary["unsupervised"]
        rate_test = welch_t_test(pu["rate"], unsupervised["rate"])
        fid_test = welch_t_test(pu["fid"], unsupervised["fid"])
        lines.append(f"PU vs unsupervised, Welch t-test: rate {rate_test}; {fid_name} {fid_test}.")
    if "pu" in summary:
        flags = " ".join(pu_flags(args.prior, args)) or "none (the training script's defaults)"
        lines.append(f"PU flags: {flags}.")
        if priors:
            lines.append(f"PU prior per seed (--prior auto estimates): {', '.join(f'{p:.3f}' for p in priors)}.")
    if filters:
        lines.append(filter_summary(filters, args))
    protocol = "from scratch" if args.protocol == "scratch" else f"fine-tuning after {args.pretrain_steps} steps"
    lines.append(
        f"Steps {args.max_train_steps} ({protocol}); shared flags: {' '.join(COMMON_TRAINING + args.train_args)}"
    )
    return "\n".join(lines) + "\n"


def filter_records(output_dir: Path, runs: list[Run]) -> dict[int, dict]:
    """seed -> filter.json of the seeds that a filtered method trained on."""
    seeds = sorted({run.seed for run in runs if run.filtered})
    return {seed: json.loads((filtered_data(output_dir, seed) / RECORD_FILE).read_text()) for seed in seeds}


def filter_summary(filters: dict[int, dict], args) -> str:
    """What the filter dropped per seed, and how many of U's sensitive images that was (the split's labels)."""
    parts = []
    for seed, record in filters.items():
        audit = record["audit"]
        parts.append(
            f"seed {seed}: {record['fraction']:.3f} of U, {audit['sensitive_dropped']} of its"
            f" {audit['sensitive_in_unlabeled']} sensitive and {audit['normal_dropped']} normal images"
            f" (sensitive share {audit['sensitive_share_before']:.3f} -> {audit['sensitive_share_after']:.3f})"
        )
    return f"Filtered methods (--filter_fraction {args.filter_fraction}) dropped: {'; '.join(parts)}."


def estimated_priors(output_dir: Path, runs: list[Run]) -> list[float]:
    """The prior each pu run estimated (prior.json), in seed order; empty when --prior was given."""
    files = [run_folder(output_dir, run) / "prior.json" for run in runs if run.name == "pu"]
    return [json.loads(file.read_text())["estimate"] for file in files if file.is_file()]


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
    run_all(runs, args.jobs, lambda run: train_and_evaluate(run, args, data, classifier))

    summary = summarize(runs)
    fid_name = fid_key(runs[0].metrics)
    ceiling = None if args.quick else classifier_ceiling(data, classifier, args)
    priors, filters = estimated_priors(output_dir, runs), filter_records(output_dir, runs)
    report = markdown_report(summary, ceiling, accuracy, fid_name, args, priors, filters)
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(json.dumps({"summary": summary, "ceiling": ceiling}, indent=2))
    bar_chart(summary, fid_name, output_dir / "chart.png")
    side_by_side_grids(
        output_dir, [run for run in runs if not run.name.startswith("pu prior")], output_dir / "grids.png"
    )
    if args.priors:
        prior_sweep_chart(summary, fid_name, output_dir / "prior_sweep.png")
    print("\n" + report + f"\nwritten to {output_dir}: results.md, results.json, chart.png, grids.png")


def run_until_stopped(main: Callable[[], None]) -> None:
    """A benchmark's ``__main__``: Ctrl-C or SIGTERM stops every step in flight, starts nothing more, and
    exits 130; finished runs stay for the next call."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the benchmark as Ctrl-C does
    try:
        main()
    except (KeyboardInterrupt, Stopped) as stop:
        stop_running_steps()
        print(f"stopped{f' ({stop})' if str(stop) else ''}: finished runs are kept and reused", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_until_stopped(main)
