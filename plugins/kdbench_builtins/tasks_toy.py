"""Offline toy tasks for the quickstart suite and tests (no files, seconds to train).

* ``toy/digits``: scikit-learn's bundled handwritten digits (real data, 1,797 8x8 images), upscaled
  to (3, 16, 16) uint8, 10 classes, a fixed seeded 80/20 train/dev split.
* ``toy/reviews``: a GENERATED 3-domain binary sentiment task. Short sentences are built from
  seeded word lists; sentiment words are partly shared and partly domain-specific, so a tiny model
  learns it and a multi-domain teacher has something to transfer. Like ``amazon/*`` its
  train/dev/test hold one domain (``domain`` option) and "meta_train" all domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import kdbench.metrics as km
from kdbench.errors import DataError
from kdbench.hookspecs import hookimpl
from kdbench.lazy import lazy_import
from kdbench.types import Task

datasets = lazy_import("datasets")  # imported on first use (keeps `kdbench ls` fast)


@dataclass(frozen=True)
class DigitsConfig:
    """Options of toy/digits."""

    max_train_examples: int = 0
    quiz_fraction: float = 0.1
    heldout_fraction: float = 0.0  # stratified share of train held out to select the best epoch (0 = none)
    data_seed: int = 42


class Digits(Task):
    """scikit-learn digits as a tiny vision task; accuracy on "dev"."""

    name = "toy/digits"
    version = "1"
    modality = "vision"
    num_labels = 10
    label_names = tuple(str(i) for i in range(10))
    metrics = ("accuracy",)
    sources = ("sklearn",)
    Config = DigitsConfig
    SPLIT_SEED = 0  # fixed: the dev split never changes

    def load(self) -> dict[str, datasets.Dataset]:
        """train (1,438) and dev (359) with ``image`` (3, 16, 16) uint8."""
        from sklearn.datasets import load_digits

        from kdbench_builtins.tasks_cifar100 import images_dataset

        d = load_digits()
        img = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
        img = img.repeat(2, axis=1).repeat(2, axis=2)  # (N, 16, 16) nearest upscale
        img = np.repeat(img[:, None], 3, axis=1)  # (N, 3, 16, 16)
        perm = np.random.default_rng(self.SPLIT_SEED).permutation(len(img))
        n_dev = len(img) // 5
        rows = {"train": np.sort(perm[n_dev:]), "dev": np.sort(perm[:n_dev])}
        self.load_info = {"source": "sklearn", "files": {s: {"file": "sklearn.datasets.load_digits",
                                                             "rows": len(r)} for s, r in rows.items()}}
        return {s: images_dataset(img[r], d.target[r].astype(np.int64))
                for s, r in rows.items()}

    def transform(self, inputs: dict[str, Tensor], *, train: bool,
                  generator: torch.Generator | None) -> dict[str, Tensor]:
        """uint8 (B, 3, 16, 16) -> float in [-1, 1]; no augmentation."""
        x = inputs["pixel_values"].float().div(127.5).sub(1.0)
        return {**inputs, "pixel_values": x}

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Accuracy."""
        return km.score(self.metrics, preds, labels)


REVIEW_DOMAINS = ("books", "kitchen", "electronics")
_NOUNS = {
    "books": ["book", "novel", "story", "author", "plot", "ending", "chapter"],
    "kitchen": ["pan", "knife", "blender", "kettle", "pot", "mixer", "toaster"],
    "electronics": ["phone", "camera", "charger", "speaker", "laptop", "screen", "battery"],
}
_SHARED = {1: ["great", "good", "excellent", "wonderful", "nice"],
           0: ["bad", "poor", "awful", "terrible", "disappointing"]}
_OWN = {
    "books": {1: ["gripping", "moving", "witty"], 0: ["boring", "dull", "predictable"]},
    "kitchen": {1: ["sturdy", "sharp", "durable"], 0: ["flimsy", "rusty", "leaky"]},
    "electronics": {1: ["fast", "bright", "reliable"], 0: ["slow", "noisy", "broken"]},
}
_FILLER = ["the", "this", "my", "really", "quite", "very", "and", "overall", "i", "think", "it", "was"]


@dataclass(frozen=True)
class ReviewsConfig:
    """Options of toy/reviews."""

    domain: str = "books"  # target domain: one of REVIEW_DOMAINS
    per_domain: int = 600  # generated sentences per domain (split 70/10/20)
    label_noise: float = 0.05  # fraction of flipped labels
    max_seq_length: int = 32
    max_train_examples: int = 0
    quiz_fraction: float = 0.1
    heldout_fraction: float = 0.0  # stratified share of train held out to select the best epoch (0 = none)
    data_seed: int = 42


def generate_reviews(per_domain: int, label_noise: float, seed: int = 1234) -> dict[str, np.ndarray]:
    """Generated sentences with ``text``, ``label``, ``domain`` arrays, (3 * per_domain,) each."""
    rng = np.random.default_rng(seed)
    text, label, domain = [], [], []
    for d_id, d in enumerate(REVIEW_DOMAINS):
        for _ in range(per_domain):
            y = int(rng.integers(2))
            pool = _SHARED[y] + _OWN[d][y] * 2  # domain words twice as likely as shared ones
            words = [str(rng.choice(_FILLER)), str(rng.choice(_NOUNS[d])), "was",
                     str(rng.choice(pool))]
            if rng.random() < 0.5:
                words += ["and", str(rng.choice(pool))]
            words += [str(w) for w in rng.choice(_FILLER, size=int(rng.integers(0, 3)))]
            text.append(" ".join(words))
            label.append(1 - y if rng.random() < label_noise else y)
            domain.append(d_id)
    return {"text": np.asarray(text, dtype=object), "label": np.asarray(label), "domain": np.asarray(domain)}


class Reviews(Task):
    """GENERATED multi-domain sentiment (see the module docstring); accuracy on "dev"."""

    name = "toy/reviews"
    version = "1-generated"
    num_labels = 2
    label_names = ("negative", "positive")
    metrics = ("accuracy",)
    domains = REVIEW_DOMAINS
    sources = ("generated",)
    Config = ReviewsConfig

    def load(self) -> dict[str, datasets.Dataset]:
        """train/dev/test of the target domain and the all-domain "meta_train"."""
        cfg = self.cfg
        if cfg.domain not in REVIEW_DOMAINS:
            raise DataError(f"task.toy/reviews.domain={cfg.domain!r} is not one of {REVIEW_DOMAINS}")
        g = generate_reviews(cfg.per_domain, cfg.label_noise)
        n_tr, n_dev = int(cfg.per_domain * 0.7), int(cfg.per_domain * 0.1)
        part = np.empty(len(g["label"]), dtype=object)  # which split each sentence is in
        pos = np.arange(len(part)) % cfg.per_domain
        part[pos < n_tr] = "train"
        part[(pos >= n_tr) & (pos < n_tr + n_dev)] = "dev"
        part[pos >= n_tr + n_dev] = "test"
        own = g["domain"] == REVIEW_DOMAINS.index(cfg.domain)
        rows = {s: np.flatnonzero((part == s) & own) for s in ("train", "dev", "test")}
        rows["meta_train"] = np.flatnonzero(part == "train")
        self.load_info = {"source": "generated", "files": {s: {"file": "generated", "rows": len(r)}
                                                           for s, r in rows.items()}}
        return {s: datasets.Dataset.from_dict(
            {"text_a": [str(t) for t in g["text"][r]], "label": g["label"][r],
             "domain": g["domain"][r], "row_id": r}) for s, r in rows.items()}

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Accuracy."""
        return km.score(self.metrics, preds, labels)


@hookimpl
def kdbench_register_tasks(register: Any) -> None:
    """Register the toy tasks."""
    register(Digits)
    register(Reviews)
