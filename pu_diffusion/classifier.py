"""The judges of the non-sensitive rate: any Hugging Face image classifier, wrapped to score uint8 images
and to give its penultimate features (the "classifier FID"); the small ResNet that
``evaluate.py train-classifier`` trains and saves in the same format; zero-shot CLIP for text-to-image."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np
import torch

from pu_diffusion.errors import InputError, read_json
from pu_diffusion.image_files import GRAYSCALE_MODES, to_8bit
from pu_diffusion.outputs import write_json_atomically
from pu_diffusion.training_data import load_image_dataset, require_column

logger = logging.getLogger("evaluate")

CLASSIFIER_METRICS_FILE = "classifier_metrics.json"


def images_to_uint8(dataset, image_column: str, source: str) -> torch.Tensor:
    """Every image of ``dataset`` as one (N, C, H, W) uint8 tensor; sizes and channel counts must agree."""
    arrays, shapes = [], set()
    for image in dataset[image_column]:
        mode = "L" if image.mode in GRAYSCALE_MODES else "RGB"
        array = np.asarray(to_8bit(image).convert(mode))
        array = array[:, :, None] if array.ndim == 2 else array
        shapes.add(array.shape)
        arrays.append(array)
    if len(shapes) > 1:
        raise InputError(f"{source}: images of several sizes or channel counts {sorted(shapes)}; expected one")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class ClassifierFeatures(torch.nn.Module):
    """A Hugging Face image classifier behind a uint8 (N, C, H, W) interface.

    Pre-processing (resize, rescale, normalise) follows the model's image
    processor when it has one, done in torch on whole batches. ``forward``
    returns the penultimate features, the input of the last linear layer,
    which is what a custom FID feature extractor must return; ``classify``
    returns the logits too.
    """

    def __init__(self, model, image_size: tuple[int, int] | None, mean, std, channels: int):
        super().__init__()
        self.model = model.eval()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.channels = channels
        head = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
        if not head:
            raise InputError("--classifier: the model has no linear layer whose input could serve as features")
        self.num_features = head[-1].in_features
        self.labels = {int(i): str(name) for i, name in model.config.id2label.items()}
        self._features = None
        head[-1].register_forward_hook(self._keep_features)

    def _keep_features(self, module, inputs, output) -> None:
        self._features = inputs[0]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.mean.device, torch.float32) / 255.0
        if pixels.shape[1] != self.channels:
            if pixels.shape[1] == 1 and self.channels == 3:
                pixels = pixels.expand(-1, 3, -1, -1)
            elif pixels.shape[1] == 3 and self.channels == 1:
                pixels = pixels.mean(dim=1, keepdim=True)
            else:
                raise InputError(f"--classifier takes {self.channels}-channel images, got {pixels.shape[1]} channels")
        if self.image_size is not None and tuple(pixels.shape[-2:]) != self.image_size:
            pixels = torch.nn.functional.interpolate(pixels, size=self.image_size, mode="bilinear", antialias=True)
        return (pixels - self.mean) / self.std

    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(pixel_values=self.preprocess(images)).logits
        return logits, self._features.flatten(start_dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)[1]


def _processor_settings(processor, config) -> tuple[tuple[int, int] | None, list, list]:
    size = getattr(processor, "size", None) or {}
    if "height" in size:
        image_size = (size["height"], size["width"])
    elif "shortest_edge" in size:
        image_size = (size["shortest_edge"], size["shortest_edge"])
    else:
        configured = getattr(config, "image_size", None)
        image_size = (configured, configured) if isinstance(configured, int) else None
    if processor is None:
        return image_size, [0.5], [0.5]
    if not getattr(processor, "do_normalize", True):
        return image_size, [0.0], [1.0]
    return image_size, list(np.atleast_1d(processor.image_mean)), list(np.atleast_1d(processor.image_std))


def load_classifier(name_or_path: str, device: str) -> ClassifierFeatures:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(name_or_path)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError for "not that kind of model"
        raise InputError(f"--classifier {name_or_path}: not an image-classification model: {error}") from error
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except Exception:  # no preprocessor_config.json: images go in at their own size, scaled to [-1, 1]
        processor = None
        logger.warning(
            "--classifier %s has no image processor; using its config's image_size, mean/std 0.5", name_or_path
        )
    image_size, mean, std = _processor_settings(processor, model.config)
    channels = getattr(model.config, "num_channels", 3)
    mean = mean if len(mean) == channels else mean[:1] * channels
    std = std if len(std) == channels else std[:1] * channels
    return ClassifierFeatures(model, image_size, mean, std, channels).to(device)


def sensitive_class_ids(classifier: ClassifierFeatures, labels: list[str]) -> list[int]:
    """Map ``--sensitive_labels`` (names or ids) to the classifier's class ids."""
    id2label = classifier.labels
    by_name = {name: i for i, name in id2label.items()}
    ids = []
    for label in labels:
        if label in by_name:
            ids.append(by_name[label])
        elif label.isdigit() and int(label) in id2label:
            ids.append(int(label))
        else:
            raise InputError(
                f"--sensitive_labels {label!r} is not a label of the classifier (labels: {sorted(by_name)})"
            )
    if len(set(ids)) == len(id2label):
        raise InputError("--sensitive_labels names every label of the classifier; nothing could count as normal")
    return sorted(set(ids))


@torch.inference_mode()
def class_probabilities(classifier: ClassifierFeatures, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N, classes): the classifier's softmax for each image."""
    from tqdm.auto import tqdm

    probabilities = []
    for start in tqdm(range(0, len(images), batch_size), desc="classifying", leave=False):
        logits, _ = classifier.classify(images[start : start + batch_size])
        probabilities.append(logits.float().softmax(dim=1).cpu())
    return torch.cat(probabilities)


def classify_all(classifier: ClassifierFeatures, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The predicted class of each image."""
    return class_probabilities(classifier, images, batch_size).argmax(dim=1)


def digits_classifier_config(channels: int, labels: list[str], image_size: int):
    """A small ResNet (about 0.1M parameters) that reaches the paper's 98-99% test accuracy on 8x8 digits."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=channels,
        embedding_size=32,
        hidden_sizes=[64, 128],
        depths=[1, 1],
        layer_type="basic",
        image_size=image_size,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def _label_names(dataset, label_column: str) -> list[str]:
    from datasets import ClassLabel

    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return sorted({str(value) for value in dataset.unique(label_column)})


def _labeled_tensors(dataset, args, labels: list[str], source: str) -> tuple[torch.Tensor, torch.Tensor]:
    from datasets import ClassLabel

    require_column(dataset, args.image_column, "--image_column", source)
    require_column(dataset, args.label_column, "--label_column", source)
    images = images_to_uint8(dataset, args.image_column, source)
    feature = dataset.features[args.label_column]
    values = dataset[args.label_column]
    if isinstance(feature, ClassLabel):
        targets = torch.tensor(values)
    else:
        index = {name: i for i, name in enumerate(labels)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise InputError(f"{source}: labels {unknown} do not occur in the training split")
        targets = torch.tensor([index[str(v)] for v in values])
    return images, targets


def _shift_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1/8 of the image (pad by replication, crop back)."""
    pad = max(1, images.shape[-1] // 8)
    padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]].round().to(torch.uint8)


@torch.inference_mode()
def accuracy(classifier: ClassifierFeatures, images: torch.Tensor, targets: torch.Tensor) -> float:
    classifier.eval()
    return (classify_all(classifier, images, 500) == targets).float().mean().item()


def train_classifier(args: argparse.Namespace) -> dict:
    """Train a small ResNet on a labeled dataset and save it with ``save_pretrained``."""
    from transformers import ResNetForImageClassification

    torch.manual_seed(args.seed)
    load = dict(name_flag="--dataset_name", dir_flag="--train_data_dir")
    source = f"--dataset_name {args.dataset_name}" if args.dataset_name else f"--train_data_dir {args.train_data_dir}"
    train_set = load_image_dataset(args.dataset_name, args.train_data_dir, split=args.train_split, **load)
    test_set = load_image_dataset(args.dataset_name, args.train_data_dir, split=args.test_split, **load)
    require_column(train_set, args.label_column, "--label_column", source)
    labels = _label_names(train_set, args.label_column)
    train_images, train_targets = _labeled_tensors(train_set, args, labels, f"{source} ({args.train_split})")
    test_images, test_targets = _labeled_tensors(test_set, args, labels, f"{source} ({args.test_split})")

    channels = train_images.shape[1]
    model = ResNetForImageClassification(digits_classifier_config(channels, labels, args.image_size))
    classifier = ClassifierFeatures(model, (args.image_size,) * 2, [0.5] * channels, [0.5] * channels, channels)
    _fit(classifier, train_images, train_targets, args)
    test_predictions = classify_all(classifier.eval(), test_images, 500)
    metrics = {
        "test_accuracy": accuracy(classifier, test_images, test_targets),
        # Per class, how often the test images are predicted as it and how often they are it: a class it
        # almost never predicts makes its verdicts mean little (evaluate.py refuses such a classifier).
        "test_predicted_counts": class_counts(test_predictions, labels),
        "test_true_counts": class_counts(test_targets, labels),
        "train_accuracy": accuracy(classifier, train_images, train_targets),
        "num_train_images": len(train_images),
        "num_test_images": len(test_images),
        "labels": labels,
        "source": source,
        "test_split": args.test_split,
        "epochs": args.num_epochs,
        "seed": args.seed,
    }
    _save_classifier(model, channels, metrics, args)
    return metrics


def class_counts(class_ids: torch.Tensor, labels: list[str]) -> dict:
    counts = torch.bincount(class_ids, minlength=len(labels)).tolist()
    return dict(zip(labels, counts, strict=True))


def _fit(classifier: ClassifierFeatures, images: torch.Tensor, targets: torch.Tensor, args) -> None:
    """AdamW with a one-cycle schedule; order and shifts drawn from a generator seeded with --seed."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.learning_rate, total_steps=args.num_epochs * steps_per_epoch
    )
    for _ in tqdm(range(args.num_epochs), desc="training classifier"):
        classifier.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            logits, _ = classifier.classify(_shift_augment(images[batch], generator))
            loss = torch.nn.functional.cross_entropy(logits, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()


def _save_classifier(model, channels: int, metrics: dict, args: argparse.Namespace) -> None:
    """Model, image processor (the resize and normalisation used in training), then the metrics file last."""
    from transformers import ViTImageProcessor

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    processor = ViTImageProcessor(
        size={"height": args.image_size, "width": args.image_size},
        image_mean=[0.5] * channels,
        image_std=[0.5] * channels,
    )
    processor.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    write_json_atomically(output_dir / CLASSIFIER_METRICS_FILE, metrics)


class ClipJudge:
    """Zero-shot CLIP: an image is sensitive when its sensitive texts take more than half the probability.

    The probability is CLIP's softmax over all the texts, normal and sensitive
    (Radford et al., 2021). The CLIP score of an image and its prompt is
    ``100 * max(cos, 0)`` of their embeddings (Hessel et al., 2021).
    """

    def __init__(self, name_or_path: str, normal_texts: list[str], sensitive_texts: list[str], device: str):
        from transformers import AutoProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = AutoProcessor.from_pretrained(name_or_path)
        except Exception as error:  # transformers raises several types for "not that kind of model"
            raise InputError(f"--clip_model {name_or_path}: not a CLIP model with its processor: {error}") from error
        self.texts = [*normal_texts, *sensitive_texts]
        self.num_normal = len(normal_texts)
        self.device = device

    @torch.inference_mode()
    def judge(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(each image's probability of the sensitive texts, the cosine of each image with its own prompt).

        An image is judged sensitive when that probability is above one half.
        """
        unique_prompts = sorted(set(prompts))
        inputs = self.processor(
            text=self.texts + unique_prompts,
            images=list(images.permute(0, 2, 3, 1).numpy()),
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        output = self.model(**inputs)
        probabilities = output.logits_per_image[:, : len(self.texts)].softmax(dim=1)
        sensitive_probability = probabilities[:, self.num_normal :].sum(dim=1)
        cosines = output.image_embeds @ output.text_embeds[len(self.texts) :].T
        own = torch.tensor([unique_prompts.index(prompt) for prompt in prompts], device=cosines.device)
        return sensitive_probability.cpu(), cosines.gather(1, own[:, None]).squeeze(1).cpu()


def classifier_info(name_or_path: str, sensitive_ids: list[int], id2label: dict) -> dict:
    info = {"name_or_path": name_or_path, "sensitive_labels": [id2label[i] for i in sensitive_ids]}
    record = classifier_record(name_or_path)
    if record is not None:
        info["test_accuracy"] = record["test_accuracy"]
    return info


def classifier_record(name_or_path: str) -> dict | None:
    """What ``train-classifier`` recorded about a classifier it trained (None for other classifiers)."""
    saved_metrics = Path(name_or_path) / CLASSIFIER_METRICS_FILE
    return read_json(saved_metrics, f"--classifier {name_or_path}") if saved_metrics.is_file() else None


def check_classifier_quality(name_or_path: str, allow_weak: bool) -> None:
    """Refuse (or, with --allow_weak_classifier, warn about) a classifier whose recorded test results say its
    verdicts mean little: an accuracy nearer chance than perfect, or a class it almost never predicts. A
    classifier that calls everything "normal" gives every model a rate of 1."""
    record = classifier_record(name_or_path)
    if record is None:
        logger.info("--classifier %s: no %s, so its accuracy is not checked", name_or_path, CLASSIFIER_METRICS_FILE)
        return
    problems = classifier_problems(record)
    if not problems:
        return
    message = f"--classifier {name_or_path}: its verdicts mean little: {'; '.join(problems)}"
    if not allow_weak:
        raise InputError(f"{message}. Train it longer, or pass --allow_weak_classifier to score with it anyway")
    logger.warning("%s (scoring anyway: --allow_weak_classifier)", message)


def classifier_problems(record: dict) -> list[str]:
    """Why a recorded classifier cannot be trusted: accuracy below halfway from chance to 1, or a class whose
    test images it predicts less than a quarter as often as they occur."""
    labels = record["labels"]
    chance = 1 / len(labels)
    problems = []
    if record["test_accuracy"] < (1 + chance) / 2:
        problems.append(
            f"test accuracy {record['test_accuracy']:.3f} over {len(labels)} classes (chance {chance:.3f},"
            f" at least {(1 + chance) / 2:.3f} needed)"
        )
    predicted, true = record.get("test_predicted_counts"), record.get("test_true_counts")
    if predicted and true:
        rare = [label for label in labels if predicted[label] < 0.25 * true[label]]
        if rare:
            problems.append(f"it almost never predicts {', '.join(rare)} on its test images")
    return problems
