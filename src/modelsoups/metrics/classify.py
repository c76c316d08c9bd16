"""Classification metrics: `accuracy` (text) and `image-accuracy` (an ImageFolder).

accuracy:       JSONL or CSV with `text` and an integer `label` (0…num_labels−1), each
                text tokenized with the default special tokens and cut to `max_length`;
                score = accuracy of argmax(logits); metrics also macro_f1 = the mean F1
                over the classes present in the labels or the predictions (scikit-learn's
                `f1_score(average="macro")`).
image-accuracy: one subfolder per class, sorted folder names = label ids; each image is
                converted to RGB and prepared by the folder's image processor; score =
                accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SoupError
from ..evaluate import Score
from .base import Batch, Progress, Settings, device_of, pad, pad_id, tokenizer
from .data import DataError, check_label, field, image_folder, lengths_order, read_records

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Accuracy", "ImageAccuracy", "macro_f1"]


def macro_f1(labels: list[int], predictions: list[int]) -> float:
    """Mean F1 over the classes seen in `labels` or `predictions` (F1 = 0 when undefined)."""
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(y == c and p == c for y, p in zip(labels, predictions, strict=True))
        fp = sum(y != c and p == c for y, p in zip(labels, predictions, strict=True))
        fn = sum(y == c and p != c for y, p in zip(labels, predictions, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _classes(config: Any, folder: Path) -> int:
    n = getattr(config, "num_labels", None)
    if not isinstance(n, int) or n < 1:
        raise SoupError(f"{folder}/config.json: no number of labels (num_labels)")
    return n


def _scores(labels: list[int], predictions: list[int], f1: bool) -> Score:
    acc = sum(y == p for y, p in zip(labels, predictions, strict=True)) / len(labels)
    extra = {"macro_f1": macro_f1(labels, predictions)} if f1 else {}
    return Score(acc, {"accuracy": acc, **extra})


@dataclass(frozen=True)
class Accuracy:
    name: str = "accuracy"
    auto_class: str = "AutoModelForSequenceClassification"

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:
        tok, classes = tokenizer(folder), _classes(config, folder)
        texts, labels = [], []
        for line, rec in read_records(data):
            text = field(data, line, rec, "text", str)
            labels.append(check_label(data, line, field(data, line, rec, "label", int), classes))
            texts.append(tok(text, truncation=True, max_length=settings.max_length)["input_ids"])
        return texts, labels, pad_id(tok)

    def batches(self, prepared: Any, settings: Settings, device: torch.device) -> list[Batch]:
        texts, labels, pid = prepared
        out = []
        for idx in lengths_order([len(t) for t in texts], settings.batch_size):
            batch = pad([texts[i] for i in idx], pid, device)
            batch["labels"] = torch.tensor([labels[i] for i in idx], device=device)
            out.append(batch)
        return out

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """Cross-entropy of a batch (what the learned soup minimises)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        labels, predictions = [], []
        for batch in self.batches(prepared, settings, device_of(model)):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            predictions += out.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
            if progress is not None:
                progress(len(labels), len(prepared[1]))
        return _scores(labels, predictions, f1=True)


@dataclass(frozen=True)
class ImageAccuracy:
    name: str = "image-accuracy"
    auto_class: str = "AutoModelForImageClassification"

    def prepare(self, data: Path, folder: Path, config: Any, settings: Settings) -> Any:  # noqa: ARG002 (Metric protocol)
        import transformers

        names, items = image_folder(data)
        classes = _classes(config, folder)
        if len(names) > classes:
            raise DataError(
                f"{data}: {len(names)} class folders, but the model has {classes} labels; "
                f"label {classes} ({names[classes]!r}) is out of range"
            )
        if not (folder / "preprocessor_config.json").is_file():
            raise SoupError(f"{folder}: no image processor (preprocessor_config.json); pass "
                            "model= (CLI: --model) naming a folder with one")  # fmt: skip
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        return items, processor

    def batches(self, prepared: Any, settings: Settings, device: torch.device) -> list[Batch]:
        from PIL import Image

        items, processor = prepared
        out = []
        for lo in range(0, len(items), settings.batch_size):
            chunk = items[lo : lo + settings.batch_size]
            images = []
            for path, _ in chunk:
                try:
                    with Image.open(path) as im:
                        images.append(im.convert("RGB"))
                except OSError as e:
                    raise DataError(f"{path}: cannot read image ({e})") from None
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            labels = torch.tensor([label for _, label in chunk])
            out.append({"pixel_values": pixels.to(device), "labels": labels.to(device)})
        return out

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return torch.nn.functional.cross_entropy(logits.float(), batch["labels"])

    def run(
        self, model: nn.Module, prepared: Any, settings: Settings, progress: Progress | None
    ) -> Score:
        labels, predictions = [], []
        dtype = next(iter(model.parameters())).dtype  # pixels in the model's dtype (bf16...)
        for batch in self.batches(prepared, settings, device_of(model)):
            pixels = batch["pixel_values"].to(dtype)
            predictions += model(pixel_values=pixels).logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
            if progress is not None:
                progress(len(labels), len(prepared[0]))
        return _scores(labels, predictions, f1=False)
