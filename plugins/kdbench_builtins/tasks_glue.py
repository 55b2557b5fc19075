"""GLUE tasks (``glue/cola`` ... ``glue/wnli``) from the original TSVs or from the Hub.

Local source: the ``download_glue_data.py`` layout (``<data_dir>/SST-2/train.tsv`` ...). TSVs are
read with quoting disabled (``csv.QUOTE_NONE`` semantics: every tab separates fields, quote
characters are text), which MNLI and QQP need. Columns are found by header name (CoLA train/dev
have no header: label col 1, sentence col 3). A row with the wrong field count or an empty
text/label field is malformed: a :class:`DataError` naming file and line, or, with
``skip_malformed=True``, skipped and counted in ``load_info``.

Label ids are exactly those of the HF ``nyu-mll/glue`` dataset (ClassLabel order), e.g. MNLI
entailment=0, neutral=1, contradiction=2 (the reference code's "[contradiction, entailment,
neutral]" order is *not* used). Test splits carry label -1.
"""

from __future__ import annotations

import csv
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

#: the 5 MNLI training genres (Meta-KD's domains); dev_mismatched/test_mismatched genres map to -1
MNLI_GENRES = ("fiction", "government", "slate", "telephone", "travel")
QUOTING = csv.QUOTE_NONE  # what the loader implements: no quote processing at all


@dataclass(frozen=True)
class GlueConfig(TextDataOptions, SourceOptions):
    """Options of every GLUE task: the shared data options, plus

    ``source`` "local" (GLUE TSVs under ``data_dir``, the folder holding SST-2/, CoLA/, ...) or
    "hub" (nyu-mll/glue)."""

    skip_malformed: bool = False  # skip (and count) malformed rows instead of failing


@dataclass(frozen=True)
class Layout:
    """Where the fields of one labelled file are (header names, or indices without header)."""

    text_a: str | int
    text_b: str | int | None
    label: str | int | None
    genre: str | None = None


def read_tsv(path: Path, *, header: bool) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Read a GLUE TSV without quote processing (every tab splits; quotes are text).

    Returns:
        (header names or [], [(1-based line number, fields)]). Field counts are checked by the
        caller; this only splits lines and decodes UTF-8 (a bad byte names file and line).
    """
    if not path.is_file():
        raise DataError(f"missing file {path}; check data_dir (the GLUE root holding SST-2/, CoLA/, ...)")
    raw = path.read_bytes().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines: list[tuple[int, list[str]]] = []
    for no, b in enumerate(raw, 1):
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{no}: not UTF-8 (byte {b[e.start]:#04x} at column {e.start + 1}); "
                            "re-encode the file as UTF-8") from None
        if no == 1:
            text = text.lstrip("\ufeff")  # MRPC files start with a byte-order mark
        lines.append((no, text.rstrip("\r").split("\t")))
    if not header:
        return [], lines
    if not lines:
        raise DataError(f"{path}: empty file, expected a header line; re-download it")
    return lines[0][1], lines[1:]


class GlueTask(Task):
    """Base of the GLUE tasks; subclasses set the file layout and label map."""

    version = "1"
    sources = ("local", "hub")
    Config = GlueConfig
    folder: ClassVar[str]  # "SST-2"
    hub_config: ClassVar[str]  # "sst2"
    hub_text: ClassVar[tuple[str, str | None]]  # HF column names of text_a / text_b
    layout: ClassVar[Layout]
    test_layout: ClassVar[Layout]
    has_header: ClassVar[bool] = True
    files: ClassVar[dict[str, str]] = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "dev": "validation", "test": "test"}
    #: TSV label string -> id, in HF nyu-mll/glue ClassLabel order (None: float regression)
    label_map: ClassVar[dict[str, int] | None] = {"0": 0, "1": 1}
    #: label strings written to GLUE-server submissions (None: the id)
    submit_labels: ClassVar[tuple[str, ...] | None] = None

    # -- loading ------------------------------------------------------------------------------

    def load(self) -> dict[str, datasets.Dataset]:
        """The splits as Datasets (text_a, [text_b], label, [domain]); see the module docstring."""
        cfg = self.cfg
        if cfg.source == "hub":
            return self._load_hub()
        if cfg.source != "local":
            raise DataError(f"task.{self.name}.source={cfg.source!r} is not one of {self.sources}")
        if not cfg.data_dir:
            raise DataError(f"task {self.name!r} needs the GLUE files: set task.{self.name}.data_dir="
                            f"<GLUE root holding {self.folder}/> or task.{self.name}.source=\"hub\"")
        root = Path(cfg.data_dir).expanduser() / self.folder
        self.load_info = {"source": "local", "data_dir": str(Path(cfg.data_dir).expanduser()), "files": {}}
        out = {}
        for split, fname in self.files.items():
            path = root / fname
            if split.startswith("test") and not path.is_file():
                self.load_info["files"][split] = {"file": str(path), "rows": 0, "absent": True}
                continue
            out[split] = self._read_split(split, path)
        return out

    def _read_split(self, split: str, path: Path) -> datasets.Dataset:
        test = split.startswith("test")
        header, lines = read_tsv(path, header=self.has_header or test)
        lay = self.test_layout if test else self.layout
        cols = {k: getattr(lay, k) for k in ("text_a", "text_b", "label", "genre")}
        if header:
            missing = [v for v in cols.values() if isinstance(v, str) and v not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {missing} (has {header}); is this "
                                f"the {self.folder} {split} file of the GLUE download?")
            idx = {k: header.index(v) if isinstance(v, str) else v for k, v in cols.items()}
            width = len(header)
        else:
            idx, width = cols, 4  # CoLA train/dev: source, label, original label, sentence
        data: dict[str, list[Any]] = {"text_a": [], "label": []}
        if lay.text_b is not None:
            data["text_b"] = []
        if self.domains:
            data["domain"] = []
        skipped = 0
        for no, f in lines:
            need = [idx["text_a"]] + [idx[k] for k in ("text_b", "label") if idx[k] is not None]
            problem = (f"has {len(f)} fields, expected {width}" if len(f) != width else
                       "has an empty text or label field" if any(f[i] == "" for i in need) else "")
            if problem:
                if self.cfg.skip_malformed:
                    skipped += 1
                    continue
                raise DataError(f"{path}:{no}: malformed row ({problem}); fix the file or set "
                                f"task.{self.name}.skip_malformed=true to skip such rows")
            data["text_a"].append(f[idx["text_a"]])
            if lay.text_b is not None:
                data["text_b"].append(f[idx["text_b"]])
            data["label"].append(-1 if idx["label"] is None else self._label(f[idx["label"]], path, no))
            if self.domains:
                genre = f[idx["genre"]] if idx["genre"] is not None else ""
                data["domain"].append(self.domains.index(genre) if genre in self.domains else -1)
        self.load_info["files"][split] = {"file": str(path), "rows": len(data["label"]),
                                          "skipped_malformed": skipped}
        return datasets.Dataset.from_dict(data, features=self._features(data))

    def _label(self, s: str, path: Path, no: int) -> int | float:
        if self.label_map is None:
            try:
                return float(s)
            except ValueError:
                raise DataError(f"{path}:{no}: score {s!r} is not a number") from None
        if s not in self.label_map:
            raise DataError(f"{path}:{no}: label {s!r} is not one of {sorted(self.label_map)}; "
                            f"is this the {self.folder} file?")
        return self.label_map[s]

    def _features(self, data: dict[str, list[Any]]) -> datasets.Features:
        f = {"text_a": datasets.Value("string"),
             "label": datasets.Value("float32" if self.is_regression else "int64")}
        if "text_b" in data:
            f["text_b"] = datasets.Value("string")
        if "domain" in data:
            f["domain"] = datasets.Value("int64")
        return datasets.Features({k: f[k] for k in data})

    def _load_hub(self) -> dict[str, datasets.Dataset]:
        """Splits from ``nyu-mll/glue`` (needs network access or a populated HF cache)."""
        dd = _hub_load(self.name, "nyu-mll/glue", self.hub_config)
        self.load_info = {"source": "hub", "dataset": f"nyu-mll/glue/{self.hub_config}", "files": {}}
        return {ours: self._from_hub(dd[theirs], ours) for ours, theirs in self.hub_splits.items()}

    def _from_hub(self, ds: datasets.Dataset, split: str, genre: str | None = None) -> datasets.Dataset:
        feat = ds.features["label"]
        if self.label_map is not None and list(getattr(feat, "names", [])) != list(self.label_names):
            raise DataError(f"hub dataset for {self.name} has labels {getattr(feat, 'names', feat)}, "
                            f"kdbench expects {list(self.label_names)}; the label maps would disagree")
        a, b = self.hub_text
        data: dict[str, Any] = {"text_a": ds[a], "label": ds["label"]}
        if b is not None:
            data["text_b"] = ds[b]
        if self.domains:
            g = ds[genre] if genre and genre in ds.column_names else [""] * len(ds)
            data["domain"] = [self.domains.index(x) if x in self.domains else -1 for x in g]
        self.load_info["files"][split] = {"file": f"hub:{split}", "rows": len(ds)}
        return datasets.Dataset.from_dict(data, features=self._features(data))

    # -- scoring ------------------------------------------------------------------------------

    def compute_metrics(self, preds: Tensor, labels: Tensor, split: str) -> dict[str, float]:
        """GLUE's official metrics on the labelled rows of ``split`` (empty for test splits)."""
        return km.score(self.metrics, preds, labels)


def _hub_load(task: str, path: str, config: str | None = None) -> Any:
    try:
        return datasets.load_dataset(path, config) if config else datasets.load_dataset(path)
    except Exception as e:
        raise DataError(f"task {task!r} source 'hub' could not load {path}{'/' + config if config else ''} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Hint: it needs "
                        f"network access or a populated HF cache; else set task.{task}.source=\"local\" "
                        f"with task.{task}.data_dir=<GLUE root>") from None


class Cola(GlueTask):
    """CoLA: grammatical acceptability; Matthews correlation. Train/dev TSVs have no header."""

    name = "glue/cola"
    folder, hub_config, hub_text = "CoLA", "cola", ("sentence", None)
    has_header = False
    layout, test_layout = Layout(3, None, 1), Layout("sentence", None, None)
    label_names = ("unacceptable", "acceptable")
    metrics = ("matthews_correlation",)


class Sst2(GlueTask):
    """SST-2: binary movie-review sentiment; accuracy."""

    name = "glue/sst2"
    folder, hub_config, hub_text = "SST-2", "sst2", ("sentence", None)
    layout, test_layout = Layout("sentence", None, "label"), Layout("sentence", None, None)
    label_names = ("negative", "positive")
    metrics = ("accuracy",)


class Mrpc(GlueTask):
    """MRPC: paraphrase pairs; F1 (primary) and accuracy."""

    name = "glue/mrpc"
    folder, hub_config, hub_text = "MRPC", "mrpc", ("sentence1", "sentence2")
    layout = Layout("#1 String", "#2 String", "Quality")
    test_layout = Layout("#1 String", "#2 String", None)
    label_names = ("not_equivalent", "equivalent")
    metrics = ("f1", "accuracy")


class Stsb(GlueTask):
    """STS-B: sentence similarity regression (0-5, num_labels=1); Pearson and Spearman."""

    name = "glue/stsb"
    folder, hub_config, hub_text = "STS-B", "stsb", ("sentence1", "sentence2")
    layout, test_layout = Layout("sentence1", "sentence2", "score"), Layout("sentence1", "sentence2", None)
    num_labels = 1
    label_map = None
    metrics = ("pearson", "spearmanr")


class Qqp(GlueTask):
    """QQP: duplicate Quora questions; F1 (primary) and accuracy."""

    name = "glue/qqp"
    folder, hub_config, hub_text = "QQP", "qqp", ("question1", "question2")
    layout = Layout("question1", "question2", "is_duplicate")
    test_layout = Layout("question1", "question2", None)
    label_names = ("not_duplicate", "duplicate")
    metrics = ("f1", "accuracy")


class Mnli(GlueTask):
    """MNLI: 3-way NLI; accuracy on dev_matched and dev_mismatched (two eval splits).

    ``domains`` are the 5 training genres (genre column 3); rows of other genres (all of
    dev/test_mismatched) get domain -1. Hub source: ``nyu-mll/multi_nli`` for the labelled splits
    (``nyu-mll/glue``'s mnli config has no genre column) and ``nyu-mll/glue``/mnli for the test
    splits; both use the same label ids.
    """

    name = "glue/mnli"
    folder, hub_config, hub_text = "MNLI", "mnli", ("premise", "hypothesis")
    layout = Layout("sentence1", "sentence2", "gold_label", "genre")
    test_layout = Layout("sentence1", "sentence2", None, "genre")
    files = {"train": "train.tsv", "dev_matched": "dev_matched.tsv",
             "dev_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
             "test_mismatched": "test_mismatched.tsv"}
    num_labels = 3
    label_names = ("entailment", "neutral", "contradiction")
    label_map = {"entailment": 0, "neutral": 1, "contradiction": 2}
    submit_labels = label_names
    domains = MNLI_GENRES
    eval_splits = ("dev_matched", "dev_mismatched")

    def _load_hub(self) -> dict[str, datasets.Dataset]:
        nli = _hub_load(self.name, "nyu-mll/multi_nli")
        glue = _hub_load(self.name, "nyu-mll/glue", "mnli")
        self.load_info = {"source": "hub", "dataset": "nyu-mll/multi_nli + nyu-mll/glue/mnli", "files": {}}
        out = {s: self._from_hub(nli[h], s, "genre") for s, h in
               (("train", "train"), ("dev_matched", "validation_matched"),
                ("dev_mismatched", "validation_mismatched"))}
        out.update({s: self._from_hub(glue[s], s) for s in ("test_matched", "test_mismatched")})
        return out


class _Entail(GlueTask):
    label_names = ("entailment", "not_entailment")
    label_map = {"entailment": 0, "not_entailment": 1}
    submit_labels = label_names
    metrics = ("accuracy",)


class Qnli(_Entail):
    """QNLI: does the sentence answer the question; accuracy."""

    name = "glue/qnli"
    folder, hub_config, hub_text = "QNLI", "qnli", ("question", "sentence")
    layout, test_layout = Layout("question", "sentence", "label"), Layout("question", "sentence", None)


class Rte(_Entail):
    """RTE: 2-way textual entailment; accuracy."""

    name = "glue/rte"
    folder, hub_config, hub_text = "RTE", "rte", ("sentence1", "sentence2")
    layout, test_layout = Layout("sentence1", "sentence2", "label"), Layout("sentence1", "sentence2", None)


class Wnli(GlueTask):
    """WNLI: Winograd NLI (TSV labels 0/1; 1 = entailment as in nyu-mll/glue); accuracy."""

    name = "glue/wnli"
    folder, hub_config, hub_text = "WNLI", "wnli", ("sentence1", "sentence2")
    layout, test_layout = Layout("sentence1", "sentence2", "label"), Layout("sentence1", "sentence2", None)
    label_names = ("not_entailment", "entailment")
    metrics = ("accuracy",)


GLUE_TASKS: tuple[type[GlueTask], ...] = (Cola, Sst2, Mrpc, Stsb, Qqp, Mnli, Qnli, Rte, Wnli)
_SUBMIT_FILES = {"glue/mnli": {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}}


def write_glue_submission(task: GlueTask | type[GlueTask], predictions: Any, out_dir: str | Path) -> list[Path]:
    """Write gluebenchmark.com submission file(s): ``index<TAB>prediction`` per test row.

    Args:
        task: a GLUE task (instance or class).
        predictions: (N,) class ids (floats for STS-B) in test-file order; for MNLI a mapping
            ``{"test_matched": ..., "test_mismatched": ...}``.
        out_dir: folder to write e.g. ``SST-2.tsv``, ``MNLI-m.tsv``/``MNLI-mm.tsv`` into.

    Returns:
        The written paths. MNLI/QNLI/RTE predictions are written as label strings, STS-B scores
        clipped to [0, 5] with 3 decimals, other tasks as 0/1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _SUBMIT_FILES.get(task.name, {"test": task.folder})
    if task.name in _SUBMIT_FILES:
        if not isinstance(predictions, dict) or set(predictions) != set(names):
            raise ValueError(f"{task.name} submissions need predictions for {sorted(names)}")
        preds_by = predictions
    else:
        preds_by = {"test": predictions}
    written = []
    for split, stem in names.items():
        raw = preds_by[split]
        p = np.asarray(raw.detach().cpu() if hasattr(raw, "detach") else raw).reshape(-1)  # (N,)
        if task.num_labels == 1:
            cells = [f"{v:.3f}" for v in np.clip(p.astype(np.float64), 0.0, 5.0)]
        else:
            ids = p.astype(np.int64)
            if ((ids < 0) | (ids >= task.num_labels)).any():
                raise ValueError(f"{task.name} predictions must be class ids 0..{task.num_labels - 1}")
            cells = [task.submit_labels[i] for i in ids] if task.submit_labels else [str(i) for i in ids]
        path = out / f"{stem}.tsv"
        path.write_text("index\tprediction\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(cells)),
                        encoding="utf-8")
        written.append(path)
    return written


@hookimpl
def kdbench_register_tasks(register: Any) -> None:
    """Register the nine GLUE tasks."""
    for cls in GLUE_TASKS:
        register(cls)
