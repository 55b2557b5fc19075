"""Offline toy tasks for the quickstart suite and tests (no files, seconds to train).

Both are built to leave room between a small student and its teacher (version 2): with clean dev
labels and version 1's easy rules every model scored the same.

* ``toy/digits``: scikit-learn's bundled handwritten digits (real data, 1,797 8x8 images), each
  drawn at a seeded random position of a (3, 16, 16) uint8 canvas with seeded pixel noise, 10
  classes, a fixed seeded 80/20 train/dev split; ``label_noise`` flips train labels only.
* ``toy/reviews``: a GENERATED 3-domain binary sentiment task. Sentences of one or two clauses
  ("the phone was not reliable but the screen was bright"): a clause's polarity is its adjective's
  (shared, domain-specific, or one whose polarity depends on the domain) flipped by "not"; after
  "but" the second clause decides, after "and" both agree. Bag-of-words models cannot read it;
  a multi-domain teacher has domain knowledge to transfer. ``label_noise`` flips train labels
  only. Like ``amazon/*`` its train/dev/test hold one domain (``domain`` option) and "meta_train"
  all domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

import kdbench
from kdbench import DataError, DataOptions, Task, TextDataOptions, hookimpl, lazy_import
from kdbench import metrics as km

if TYPE_CHECKING:
    import datasets
else:
    datasets = lazy_import("datasets")  # imported on first use (keeps `kdbench ls` fast)


@dataclass(frozen=True)
class DigitsConfig(DataOptions):
    """Options of toy/digits: the shared data options, plus"""

    #: the digit is moved by up to this many pixels in each direction (seeded)
    shift: int = kdbench.option(2, ge=0)
    #: std of the pixel noise, as a fraction of the full 0..255 range
    noise: float = kdbench.option(0.15, ge=0)
    #: fraction of train labels replaced by another class (dev stays clean)
    label_noise: float = kdbench.option(0.1, ge=0, lt=1)


def flip_labels(labels: np.ndarray, fraction: float, num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of (N,) ``labels`` with a seeded ``fraction`` of them replaced by another class."""
    out = labels.copy()
    idx = rng.permutation(len(out))[: round(fraction * len(out))]
    out[idx] = (out[idx] + rng.integers(1, num_labels, len(idx))) % num_labels
    return out


def _check_fraction(task: str, key: str, value: float) -> None:
    if not 0.0 <= value < 0.5:
        raise DataError(f"task.{task}.{key}={value} must be in [0, 0.5)")


class Digits(Task):
    """scikit-learn digits at random positions in noise; accuracy on "dev" (module docstring)."""

    name = "toy/digits"
    version = "2"
    modality = "vision"
    num_labels = 10
    label_names = tuple(str(i) for i in range(10))
    metrics = ("accuracy",)
    sources = ("sklearn",)
    Config = DigitsConfig
    SPLIT_SEED = 0  # fixed: the dev split, positions and noise never change

    def load(self) -> dict[str, datasets.Dataset]:
        """train (1,438) and dev (359) with ``image`` (3, 16, 16) uint8."""
        from sklearn.datasets import load_digits

        from kdbench_builtins.tasks_cifar100 import images_dataset

        cfg = self.cfg
        _check_fraction(self.name, "label_noise", cfg.label_noise)
        if cfg.noise < 0 or not 0 <= cfg.shift <= 8:
            raise DataError(f"task.{self.name}: noise={cfg.noise} must be >= 0 and shift={cfg.shift} in 0..8")
        d = load_digits()
        rng = np.random.default_rng(self.SPLIT_SEED)
        n = len(d.images)
        big = (d.images * (255.0 / 16.0)).repeat(2, axis=1).repeat(2, axis=2)  # (N, 16, 16) 0..255
        m = cfg.shift
        canvas = np.zeros((n, 16 + 2 * m, 16 + 2 * m))
        canvas[:, m:m + 16, m:m + 16] = big
        pos = rng.integers(0, 2 * m + 1, (n, 2))  # top-left corner of the 16x16 crop
        img = np.stack([canvas[i, r:r + 16, c:c + 16] for i, (r, c) in enumerate(pos)])  # (N, 16, 16)
        img = img[:, None] + rng.normal(0.0, cfg.noise * 255.0, (n, 3, 16, 16))  # (N, 3, 16, 16)
        img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        perm = rng.permutation(n)
        n_dev = n // 5
        rows = {"train": np.sort(perm[n_dev:]), "dev": np.sort(perm[:n_dev])}
        labels = {"train": flip_labels(d.target[rows["train"]].astype(np.int64), cfg.label_noise, 10, rng),
                  "dev": d.target[rows["dev"]].astype(np.int64)}
        self.load_info = {"source": "sklearn", "files": {s: {"file": "sklearn.datasets.load_digits",
                                                             "rows": len(r)} for s, r in rows.items()}}
        return {s: images_dataset(img[r], labels[s]) for s, r in rows.items()}

    def transform(self, inputs: dict[str, Tensor], *, train: bool,
                  generator: torch.Generator | None) -> dict[str, Tensor]:
        """uint8 (B, 3, 16, 16) -> float in [-1, 1]; no augmentation."""
        x = inputs["pixel_values"].float().div(127.5).sub(1.0)
        return {**inputs, "pixel_values": x}

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Accuracy."""
        return km.score(self.metrics, preds, labels)


ReviewDomain = Literal["books", "kitchen", "electronics"]
REVIEW_DOMAINS: tuple[str, ...] = get_args(ReviewDomain)
_NOUNS = {
    "books": ["book", "novel", "story", "author", "plot", "ending", "chapter"],
    "kitchen": ["pan", "knife", "blender", "kettle", "pot", "mixer", "toaster"],
    "electronics": ["phone", "camera", "charger", "speaker", "laptop", "screen", "battery"],
}
_SHARED = {1: ["great", "good", "excellent", "nice"], 0: ["bad", "poor", "awful", "terrible"]}
_OWN = {
    "books": {1: ["gripping", "moving", "witty"], 0: ["boring", "dull", "shallow"]},
    "kitchen": {1: ["sturdy", "sharp", "durable"], 0: ["flimsy", "rusty", "leaky"]},
    "electronics": {1: ["fast", "bright", "reliable"], 0: ["slow", "noisy", "broken"]},
}
#: adjectives whose polarity depends on the domain (books, kitchen, electronics)
_DOMAIN_POLARITY = {"light": (0, 1, 1), "long": (1, 0, 1), "quiet": (0, 1, 1)}
_FILLER = ["really", "quite", "very", "overall", "honestly", "i think"]


@dataclass(frozen=True)
class ReviewsConfig(TextDataOptions):
    """Options of toy/reviews: the shared data options, plus"""

    #: character tokens: the longest generated sentence (67) fits
    max_seq_length: int = kdbench.option(80, ge=4)
    domain: ReviewDomain = "books"  # target domain
    per_domain: int = kdbench.option(600, ge=10)  # generated sentences per domain (split 70/10/20)
    #: fraction of train labels flipped (dev and test stay clean)
    label_noise: float = kdbench.option(0.05, ge=0, lt=1)


def _clause(rng: np.random.Generator, d: int, y: int) -> str:
    """One clause of polarity ``y`` about a domain-``d`` noun: "[filler] the NOUN was [not] ADJ"."""
    negate = bool(rng.random() < 0.15)
    want = 1 - y if negate else y  # the adjective's own polarity
    pool = _SHARED[want] + _OWN[REVIEW_DOMAINS[d]][want] + [w for w, p in _DOMAIN_POLARITY.items()
                                                           if p[d] == want]
    words = ["the", str(rng.choice(_NOUNS[REVIEW_DOMAINS[d]])), "was"]
    if rng.random() < 0.3:
        words.insert(0, str(rng.choice(_FILLER)))
    return " ".join(words + ["not"] * negate + [str(rng.choice(pool))])


def generate_reviews(per_domain: int, seed: int = 1234) -> dict[str, np.ndarray]:
    """Generated sentences with clean ``text``, ``label``, ``domain`` arrays, (3 * per_domain,) each."""
    rng = np.random.default_rng(seed)
    text, label, domain = [], [], []
    for d in range(len(REVIEW_DOMAINS)):
        for _ in range(per_domain):
            y = int(rng.integers(2))
            form = rng.random()
            if form < 0.15:  # "A but B": B decides, A has the other polarity
                sent = f"{_clause(rng, d, 1 - y)} but {_clause(rng, d, y)}"
            elif form < 0.3:  # "A and B": both agree
                sent = f"{_clause(rng, d, y)} and {_clause(rng, d, y)}"
            else:
                sent = _clause(rng, d, y)
            text.append(sent)
            label.append(y)
            domain.append(d)
    return {"text": np.asarray(text, dtype=object), "label": np.asarray(label), "domain": np.asarray(domain)}


class Reviews(Task):
    """GENERATED multi-domain sentiment (see the module docstring); accuracy on "dev"."""

    name = "toy/reviews"
    version = "2-generated"
    num_labels = 2
    label_names = ("negative", "positive")
    metrics = ("accuracy",)
    domains = REVIEW_DOMAINS
    pooled_splits = ("meta_train",)  # Meta-KD's meta-teacher trains on every domain
    sources = ("generated",)
    Config = ReviewsConfig

    def load(self) -> dict[str, datasets.Dataset]:
        """train/dev/test of the target domain and the all-domain "meta_train"."""
        cfg = self.cfg
        if cfg.domain not in REVIEW_DOMAINS:
            raise DataError(f"task.toy/reviews.domain={cfg.domain!r} is not one of {REVIEW_DOMAINS}")
        _check_fraction(self.name, "label_noise", cfg.label_noise)
        g = generate_reviews(cfg.per_domain)
        n_tr, n_dev = int(cfg.per_domain * 0.7), int(cfg.per_domain * 0.1)
        part = np.empty(len(g["label"]), dtype=object)  # which split each sentence is in
        pos = np.arange(len(part)) % cfg.per_domain
        part[pos < n_tr] = "train"
        part[(pos >= n_tr) & (pos < n_tr + n_dev)] = "dev"
        part[pos >= n_tr + n_dev] = "test"
        own = g["domain"] == REVIEW_DOMAINS.index(cfg.domain)
        rows = {s: np.flatnonzero((part == s) & own) for s in ("train", "dev", "test")}
        rows["meta_train"] = np.flatnonzero(part == "train")
        noisy = g["label"].copy()  # one draw for all train rows: train is a subset of meta_train
        noisy[rows["meta_train"]] = flip_labels(g["label"][rows["meta_train"]], cfg.label_noise, 2,
                                                np.random.default_rng(4321))
        lab = {s: (noisy if s in ("train", "meta_train") else g["label"])[r] for s, r in rows.items()}
        self.load_info = {"source": "generated", "files": {s: {"file": "generated", "rows": len(r)}
                                                           for s, r in rows.items()}}
        return {s: datasets.Dataset.from_dict(
            {"text_a": [str(t) for t in g["text"][r]], "label": lab[s],
             "domain": g["domain"][r], "row_id": r}) for s, r in rows.items()}

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Accuracy."""
        return km.score(self.metrics, preds, labels)


@hookimpl
def kdbench_register_tasks(register: Any) -> None:
    """Register the toy tasks."""
    register(Digits)
    register(Reviews)
