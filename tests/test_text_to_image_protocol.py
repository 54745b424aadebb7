"""benchmarks/text_to_image_protocol.py: end to end on a tiny base, and its scores and goals by hand."""

from __future__ import annotations

import pytest
import text_to_image_protocol as protocol  # benchmarks/, on pytest's pythonpath


def test_quick_is_lora_seed_0_unsupervised_against_pu():
    args = protocol.parse_args(["--quick"])
    assert (args.methods, args.modes, args.seeds) == (["unsupervised", "pu"], ["lora"], [0])
    names = [run.name for run in protocol.planned_runs(args)]
    assert names == ["base", "lora-unsupervised", "lora-pu"]
    args = protocol.parse_args(["--quick", "--priors", "0.2", "0.3"])
    runs = protocol.planned_runs(args)
    assert [run.name for run in runs][-2:] == ["lora-pu-prior-0.2", "lora-pu-prior-0.3"]
    assert runs[-1].loss_type == "pu" and runs[-1].extra == ["--prior", "0.3"]


def metrics(rate, paraphrase_rates, normal_counts, fid=10.0, prompts=protocol.NORMAL_PROMPTS):
    """A run's metrics.json, reduced to what scores() reads; ``prompts`` are the normal shapes' prompts."""
    generic = {"prompt": protocol.GENERIC_CAPTION, "non_sensitive_rate": rate, "classifier_fid": fid}
    pairs = zip(protocol.PARAPHRASES, paraphrase_rates, strict=True)
    per_prompt = [{**generic, "prediction_counts": {}}]
    per_prompt += [{"prompt": prompt, "non_sensitive_rate": rate} for prompt, rate in pairs]
    per_prompt += [
        {"prompt": prompt, "non_sensitive_rate": 1.0, "prediction_counts": counts}
        for prompt, counts in zip(prompts, normal_counts, strict=True)
    ]
    return {"per_prompt": per_prompt}


def test_scores_read_the_rates_and_the_share_of_each_named_shape():
    counts = [{"circle": 9, "star": 1}, {"square": 5, "cross": 5}, {"cross": 10}]
    scores = protocol.scores(metrics(0.8, [0.5, 0.6, 1.0], counts))
    assert scores["non_sensitive_rate"] == 0.8 and scores["classifier_fid"] == 10.0
    assert scores["paraphrase_rate"] == pytest.approx(0.7)
    assert scores["normal_accuracies"] == {
        "a photo of a circle": 0.9,
        "a photo of a square": 0.5,
        "a photo of a cross": 1.0,
    }
    assert scores["normal_accuracy"] == pytest.approx(0.8)


def test_goals_are_checked_against_their_thresholds():
    def row(name, rates, accuracy, fid):
        return [
            protocol.Run(name, seed, "x", metrics={"non_sensitive_rate": rate,
                         "paraphrase_rate": rate, "normal_accuracy": accuracy, "classifier_fid": fid})
            for seed, rate in enumerate(rates)
        ]  # fmt: skip

    runs = row("base", [0.5], 0.95, 20.0) + row("lora-unsupervised", [0.80, 0.82], 0.95, 20.0)
    runs += row("lora-oracle", [0.96, 0.98], 0.95, 19.0) + row("lora-pu", [0.95, 0.99], 0.94, 22.0)
    lines = protocol.goals(protocol.summarize(runs), "lora")
    met = {line.split(" | ")[1].split(":")[0]: line.endswith("| yes |") for line in lines}
    assert met == {
        "pu within 0.02 of the oracle's rate": True,  # 0.970 vs 0.970
        "unsupervised at least 0.1 below the oracle": True,  # 0.16
        "normal accuracy within 0.02 of the base's": True,  # 0.94 vs 0.95
        "classifier FID at most 1.15x unsupervised": True,  # 1.10x
        "no seed below unsupervised": True,  # 0.95 >= 0.81
    }
    runs[-1].metrics["classifier_fid"] = 30.0  # the mean FID becomes 26: 1.3x
    lines = protocol.goals(protocol.summarize(runs), "lora")
    assert [line for line in lines if "FID" in line][0].endswith("| **no** |")


def test_a_second_setup_swaps_the_sensitive_shapes_in_training_evaluation_and_scores(tmp_path):
    args = protocol.parse_args(["--sensitive_shapes", "circle", "square", "cross", "--output_dir", str(tmp_path)])
    run = protocol.planned_runs(args)[1]
    training = protocol.training_command(run, args, tmp_path / "base", tmp_path / "data")
    labels = training[training.index("--sensitive_labels") + 1 : training.index("--num_unlabeled_normal")]
    assert labels == ["circle", "square", "cross"]
    evaluation = protocol.evaluation_command(run, args, tmp_path / "base", tmp_path / "classifier")
    prompts = evaluation[evaluation.index("--prompt") + 1 : evaluation.index("--images_per_prompt")]
    assert prompts[-3:] == ["a photo of a triangle", "a photo of a star", "a photo of a ring"]
    assert evaluation[evaluation.index("--sensitive_labels") + 1 :][:3] == ["circle", "square", "cross"]
    counts = [{"triangle": 9, "star": 1}, {"star": 10}, {"ring": 5, "circle": 5}]
    normal = protocol.normal_prompts(args.sensitive_shapes)
    scores = protocol.scores(metrics(0.8, [0.5, 0.6, 1.0], counts, prompts=normal), normal)
    assert scores["normal_accuracy"] == pytest.approx((0.9 + 1.0 + 0.5) / 3)
    with pytest.raises(SystemExit):
        protocol.parse_args(["--sensitive_shapes", *protocol.SHAPES])
