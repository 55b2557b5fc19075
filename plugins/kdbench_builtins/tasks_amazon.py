"""Blitzer et al. (2007) multi-domain Amazon reviews, split exactly as Meta-KD does.

Tasks ``amazon/books``, ``amazon/dvd``, ``amazon/electronics``, ``amazon/kitchen``: binary
sentiment (negative=0, positive=1) of one domain. Splits follow EasyNLP's
``generate_senti_data.py`` (alibaba/EasyNLP@a4ee956): all 8,000 labelled reviews in the order
books, dvd, electronics, kitchen (each positive then negative), shuffled with
``RandomState(11111)`` (what ``DataFrame.sample(frac=1, random_state=11111)`` does); test = first
fold of ``StratifiedKFold(10, shuffle=True, random_state=11111)`` on sentiment; dev = first fold of
the same on the rest. Sizes 6,480 / 720 / 800 over all domains. A task's train/dev/test keep only
its domain; "meta_train" is the whole multi-domain train (Meta-KD's meta-teacher), with a
``row_id`` so the pipeline can drop the task's quiz rows from it.

Review text = the lines between ``<review_text>`` and ``</review_text>``, stripped, blank lines
dropped, joined with single spaces, tabs turned into spaces. (EasyNLP concatenates lines without a
separator and re-appends the previous line on blank lines; kdbench does not copy that quirk. The
split indices do not depend on the text, so the splits are the same.)
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import Tensor

from kdbench import DataError, SourceOptions, Task, TextDataOptions, hookimpl, lazy_import
from kdbench import metrics as km

if TYPE_CHECKING:
    import datasets
else:
    datasets = lazy_import("datasets")  # imported on first use (keeps `kdbench ls` fast)

DOMAINS = ("books", "dvd", "electronics", "kitchen")
FOLDERS = {"books": "books", "dvd": "dvd", "electronics": "electronics",
           "kitchen": "kitchen_&_housewares"}
ARCHIVE_URL = "https://www.cs.jhu.edu/~mdredze/datasets/sentiment/domain_sentiment_data.tar.gz"
#: sha256 of the 8 labelled files (identical in two independent copies of the archive).
#: The archive's own sha256 could not be obtained offline: set ``archive_sha256`` to pin it too.
FILE_SHA256 = {
    "books/negative.review": "562c58de7f739c9af2d62377ea2253ff73e89f69c84a332088f341cdb0e09660",
    "books/positive.review": "72c39d63dfd7edf77895de7c796f67e095f847f4b56bca0704aba3bbf57f23b9",
    "dvd/negative.review": "de1b539d29dc7edfbabf0ca4b1bce4e296d486533f3730012e4b49e36e762fa3",
    "dvd/positive.review": "fcf5207f79aa8af4910b5793c15fe90f25eb39501f9f4bdbd8f60a817224e28d",
    "electronics/negative.review": "571287120d63e289753231804f33169b2ec4348ca6d24fa0d781a3a08e6376ff",
    "electronics/positive.review": "98daefad1056ec8d98fe910bdb50ae282695b9c2b89c2bc1513b9d2203b38a11",
    "kitchen_&_housewares/negative.review": "0ad1fa1f4539b47933fcef01be674b1246d1dc01403197c1439004cbaf4b543e",
    "kitchen_&_housewares/positive.review": "90ebec2b5a6ac040e16836c32b8efbd92ce98804b916c6367f7ade3b8d536798",
}
SEED = 11111


@dataclass(frozen=True)
class AmazonConfig(TextDataOptions, SourceOptions):
    """Options of the Amazon tasks: the shared data options, plus

    ``source`` "local" (the sorted_data_acl folder is ``data_dir``) or "download" (Blitzer's
    archive, unpacked under ``data_dir``)."""

    archive_sha256: str = ""  # optional pin of the archive itself (hex)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`DataError` (and delete ``path``) unless its sha256 is ``expected``."""
    got = sha256_file(path)
    if got != expected.lower():
        path.unlink(missing_ok=True)
        raise DataError(f"{path}: sha256 {got} does not match the expected {expected}; the file was "
                        "deleted, download it again (or check the pinned checksum)")


def download_archive(url: str, dest_dir: Path, *, archive_sha256: str = "",
                     file_sha256: dict[str, str] | None = None) -> Path:
    """Fetch the reviews archive, verify it and extract the labelled files.

    Args:
        url: archive URL (any scheme urllib opens).
        dest_dir: receives ``sorted_data_acl/<folder>/{positive,negative}.review``.
        archive_sha256: when set, the archive's sha256 must match.
        file_sha256: pinned sha256 per extracted ``<folder>/<file>`` (default :data:`FILE_SHA256`).

    Returns:
        The ``sorted_data_acl`` folder.
    """
    pins = FILE_SHA256 if file_sha256 is None else file_sha256
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / "domain_sentiment_data.tar.gz"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, archive.open("wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise DataError(f"could not download {url} ({e}); download it by hand and set data_dir to "
                        "the extracted sorted_data_acl folder with source=\"local\"") from None
    if archive_sha256:
        verify_sha256(archive, archive_sha256)
    root = dest_dir / "sorted_data_acl"
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            rel = "/".join(parts[-2:])
            if len(parts) < 2 or rel not in {f"{FOLDERS[d]}/{s}.review" for d in DOMAINS
                                             for s in ("positive", "negative")} or not member.isfile():
                continue  # only the 8 labelled files; never a path from the archive itself
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, target.open("wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
    for rel, digest in pins.items():
        if not (root / rel).is_file():
            raise DataError(f"{archive}: has no {rel}; is this Blitzer's domain_sentiment_data.tar.gz?")
        verify_sha256(root / rel, digest)
    return root


def read_reviews(path: Path) -> list[str]:
    """Texts of the ``<review_text>`` blocks of one pseudo-XML ``.review`` file."""
    if not path.is_file():
        raise DataError(f"missing file {path}; data_dir must be the sorted_data_acl folder "
                        f"(holding {', '.join(FOLDERS.values())})")
    texts: list[str] = []
    inside: list[str] | None = None
    start = 0
    for no, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{no}: not UTF-8 (byte {raw[e.start]:#04x}); re-encode the file") from None
        if line == "<review_text>":
            if inside is not None:
                raise DataError(f"{path}:{no}: <review_text> opened again before </review_text> "
                                f"(opened at line {start}); the file is damaged")
            inside, start = [], no
        elif line == "</review_text>":
            if inside is None:
                raise DataError(f"{path}:{no}: </review_text> without <review_text>; the file is damaged")
            texts.append(" ".join(s for s in (x.replace("\t", " ").strip() for x in inside) if s))
            inside = None
        elif inside is not None:
            inside.append(line)
    if inside is not None:
        raise DataError(f"{path}:{start}: <review_text> never closed; the file is truncated")
    if not texts:
        raise DataError(f"{path}: no <review_text> blocks; is this a Blitzer .review file?")
    return texts


def meta_kd_splits(sentiment: np.ndarray) -> dict[str, np.ndarray]:
    """Row positions (into the unshuffled corpus) of Meta-KD's train/dev/test, in its order."""
    if np.bincount(sentiment, minlength=2).min() < 20:
        raise DataError(f"only {np.bincount(sentiment, minlength=2).tolist()} negative/positive reviews; "
                        "the 10-fold split needs at least 20 of each (is data_dir the full sorted_data_acl?)")
    perm = np.random.RandomState(SEED).permutation(len(sentiment))  # == DataFrame.sample(frac=1)
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=10, shuffle=True, random_state=SEED)
    rest, test = next(iter(skf.split(np.zeros(len(perm)), sentiment[perm])))
    rest_rows = perm[rest]
    tr, dev = next(iter(skf.split(np.zeros(len(rest_rows)), sentiment[rest_rows])))
    return {"train": rest_rows[tr], "dev": rest_rows[dev], "test": perm[test]}


class AmazonTask(Task):
    """Sentiment of one Amazon domain; accuracy. See the module docstring for the splits."""

    version = "1"
    num_labels = 2
    label_names = ("negative", "positive")
    metrics = ("accuracy",)
    domains = DOMAINS
    pooled_splits = ("meta_train",)  # Meta-KD's meta-teacher trains on every domain
    sources = ("local", "download")
    Config = AmazonConfig
    domain: ClassVar[str]

    def _root(self) -> Path:
        cfg = self.cfg
        if cfg.source not in self.sources:
            raise DataError(f"task.{self.name}.source={cfg.source!r} is not one of {self.sources}")
        if not cfg.data_dir:
            raise DataError(f"task {self.name!r} needs the reviews: set task.{self.name}.data_dir=<the "
                            f"sorted_data_acl folder> or task.{self.name}.source=\"download\" with a data_dir "
                            "to download into")
        root = Path(cfg.data_dir).expanduser()
        if cfg.source == "download" and not all((root / r).is_file() for r in FILE_SHA256):
            root = download_archive(ARCHIVE_URL, root, archive_sha256=cfg.archive_sha256)
        return root

    def load(self) -> dict[str, datasets.Dataset]:
        """train/dev/test of this domain plus the all-domain "meta_train"."""
        root = self._root()
        text: list[str] = []
        sent: list[int] = []
        dom: list[int] = []
        files = {}
        for d_id, d in enumerate(DOMAINS):
            for label, pol in ((1, "positive"), (0, "negative")):
                path = root / FOLDERS[d] / f"{pol}.review"
                reviews = read_reviews(path)
                files[f"{FOLDERS[d]}/{pol}.review"] = len(reviews)
                text += reviews
                sent += [label] * len(reviews)
                dom += [d_id] * len(reviews)
        sentiment, domain = np.asarray(sent), np.asarray(dom)
        own = DOMAINS.index(self.domain)
        rows = meta_kd_splits(sentiment)
        rows["meta_train"] = rows["train"]
        for s in ("train", "dev", "test"):
            rows[s] = rows[s][domain[rows[s]] == own]

        def build(r: np.ndarray) -> datasets.Dataset:
            return datasets.Dataset.from_dict(
                {"text_a": [text[i] for i in r], "label": sentiment[r], "domain": domain[r], "row_id": r},
                features=datasets.Features({"text_a": datasets.Value("string"),
                                            "label": datasets.Value("int64"),
                                            "domain": datasets.Value("int64"),
                                            "row_id": datasets.Value("int64")}))

        out = {s: build(r) for s, r in rows.items()}
        self.load_info = {"source": self.cfg.source, "data_dir": str(root),
                          "reviews_per_file": files, "total_reviews": len(text),
                          "split": "Meta-KD (EasyNLP generate_senti_data.py), seed 11111",
                          "files": {s: {"file": str(root), "rows": len(d)} for s, d in out.items()}}
        return out

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """Accuracy on the labelled rows of ``split``."""
        return km.score(self.metrics, preds, labels)


class Books(AmazonTask):
    """Amazon reviews, books domain."""

    name, domain = "amazon/books", "books"


class Dvd(AmazonTask):
    """Amazon reviews, dvd domain."""

    name, domain = "amazon/dvd", "dvd"


class Electronics(AmazonTask):
    """Amazon reviews, electronics domain."""

    name, domain = "amazon/electronics", "electronics"


class Kitchen(AmazonTask):
    """Amazon reviews, kitchen & housewares domain."""

    name, domain = "amazon/kitchen", "kitchen"


@hookimpl
def kdbench_register_tasks(register: Any) -> None:
    """Register the four Amazon domain tasks."""
    for cls in (Books, Dvd, Electronics, Kitchen):
        register(cls)
