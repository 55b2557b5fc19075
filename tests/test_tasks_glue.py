"""GLUE loaders: official row counts, label maps (local == hub), TSV quirks, errors, submissions."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest

from kdbench.contract.errors import DataError
from kdbench_builtins import tasks_glue as tg
from kdbench_builtins.tasks_glue import GlueConfig, Mnli, Qnli, Qqp, write_glue_submission

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GLUE = SHARED / "data" / "glue"
KSHOT = SHARED / "data" / "glue_kshot_lmbff"
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue absent")
needs_kshot = pytest.mark.skipif(not KSHOT.is_dir(), reason="../shared/data/glue_kshot_lmbff absent")

MNLI_DEV_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse "
                   "sentence1_parse sentence2_parse sentence1 sentence2 label1 label2 label3 label4 "
                   "label5 gold_label").split()
MNLI_TEST_HEADER = MNLI_DEV_HEADER[:10]


def write(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mnli_dev_row(i: int, genre: str, s1: str, s2: str, gold: str) -> list[str]:
    return [str(i), "1", f"{i}e", genre, "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
            gold, gold, gold, gold, gold, gold]


def load(cls: type[tg.GlueTask], root: Path, **kw: Any) -> dict[str, datasets.Dataset]:
    return cls(GlueConfig(data_dir=str(root), **kw)).load()


@needs_glue
@pytest.mark.parametrize("cls,train,dev", [(tg.Sst2, 67349, 872), (tg.Mrpc, 3668, 408),
                                           (tg.Cola, 8551, 1043), (tg.Stsb, 5749, 1500),
                                           (tg.Rte, 2490, 277)])
def test_official_row_counts(cls: type[tg.GlueTask], train: int, dev: int) -> None:
    task = cls(GlueConfig(data_dir=str(GLUE)))
    d = task.load()
    assert (len(d["train"]), len(d["dev"])) == (train, dev)
    assert task.load_info["files"]["train"]["rows"] == train
    assert set(d["test"]["label"]) == {-1}


@needs_glue
def test_local_values_and_label_ids() -> None:
    sst = load(tg.Sst2, GLUE)
    assert sst["train"][0] == {"text_a": "hide new secretions from the parental units ", "label": 0}
    mrpc = load(tg.Mrpc, GLUE)  # header starts with a byte-order mark
    assert mrpc["train"][0]["label"] == 1 and mrpc["train"][0]["text_b"].startswith("Referring to him")
    rte = load(tg.Rte, GLUE)
    assert rte["train"][0]["label"] == 1  # not_entailment
    assert load(tg.Stsb, GLUE)["train"][0]["label"] == 5.0
    assert load(tg.Cola, GLUE)["dev"][0]["text_a"] == "The sailors rode the breeze clear of the rocks."


def test_label_maps_agree_with_hf_glue() -> None:
    """TSV strings map to the ClassLabel ids of nyu-mll/glue (names in id order)."""
    hf = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
          "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
          "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
          "rte": ["entailment", "not_entailment"], "wnli": ["not_entailment", "entailment"]}
    for cls in tg.GLUE_TASKS:
        if cls.label_map is None:
            assert cls.num_labels == 1 and cls.hub_config == "stsb"
            continue
        assert list(cls.label_names) == hf[cls.hub_config]
        assert len(cls.label_map) == cls.num_labels
    assert Mnli.label_map == {"entailment": 0, "neutral": 1, "contradiction": 2}
    for cls in (tg.Qnli, tg.Rte):
        assert {s: cls.label_names[i] for s, i in cls.label_map.items()} == {s: s for s in cls.label_map}


@needs_kshot
def test_kshot_mnli_train_layout_qqp_qnli(tmp_path: Path) -> None:
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    shutil.copy(KSHOT / "MNLI/16-42/train.tsv", mnli / "train.tsv")  # 12-column train layout
    shutil.copy(KSHOT / "MNLI/16-42/dev_matched.tsv", mnli / "dev_matched.tsv")
    write(mnli / "dev_mismatched.tsv", [MNLI_DEV_HEADER, mnli_dev_row(0, "letters", "P", "H", "neutral")])
    d = load(Mnli, tmp_path)
    assert len(d["train"]) == 48 and len(d["dev_matched"]) == 48
    assert sorted(set(d["train"]["label"])) == [0, 1, 2]
    assert d["train"].to_pandas()["label"].value_counts().tolist() == [16, 16, 16]
    assert set(d["train"]["domain"]) <= {0, 1, 2, 3, 4} and len(set(d["train"]["domain"])) >= 3
    assert d["dev_mismatched"]["domain"] == [-1] and d["dev_mismatched"]["label"] == [1]
    assert "test_matched" not in d
    for cls, folder in ((Qqp, "QQP"), (Qnli, "QNLI")):
        shutil.copytree(KSHOT / folder / "16-42", tmp_path / folder)
        out = load(cls, tmp_path)
        assert len(out["train"]) == 32 and len(out["dev"]) == 32
        assert sorted(set(out["train"]["label"])) == [0, 1]


def test_generated_real_format_mnli_and_qqp_quotes(tmp_path: Path) -> None:
    write(tmp_path / "MNLI/train.tsv", [MNLI_DEV_HEADER[:10] + ["label1", "gold_label"],
                                        mnli_dev_row(0, "fiction", 'He said "hi', "x", "contradiction")[:11] + ["contradiction"],
                                        mnli_dev_row(1, "travel", "a", "b", "entailment")[:11] + ["entailment"]])
    write(tmp_path / "MNLI/dev_matched.tsv", [MNLI_DEV_HEADER, mnli_dev_row(0, "slate", "a", "b", "neutral")])
    write(tmp_path / "MNLI/dev_mismatched.tsv", [MNLI_DEV_HEADER, mnli_dev_row(0, "oup", "a", "b", "entailment")])
    write(tmp_path / "MNLI/test_matched.tsv", [MNLI_TEST_HEADER, mnli_dev_row(0, "government", "a", "b", "")[:10]])
    d = load(Mnli, tmp_path)
    assert d["train"]["text_a"][0] == 'He said "hi' and d["train"]["label"] == [2, 0]
    assert d["train"]["domain"] == [0, 4] and d["dev_matched"]["domain"] == [2]
    assert d["test_matched"]["label"] == [-1] and d["test_matched"]["domain"] == [1]
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write(tmp_path / "QQP/train.tsv", [header, ["0", "1", "2", '"Why" is it?', 'what "is', "1"],
                                       ["1", "3", "4", "a", "b", "0"]])
    write(tmp_path / "QQP/dev.tsv", [header, ["0", "1", "2", "a", "b", "0"]])
    write(tmp_path / "QQP/test.tsv", [["id", "question1", "question2"], ["0", "c", "d"]])
    q = load(Qqp, tmp_path)
    assert q["train"]["text_a"][0] == '"Why" is it?' and q["train"]["text_b"][0] == 'what "is'
    assert q["train"]["label"] == [1, 0] and q["test"]["label"] == [-1]


def qqp_files(tmp_path: Path, bad_row: list[str]) -> Path:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write(tmp_path / "QQP/train.tsv", [header, ["0", "1", "2", "a", "b", "1"], bad_row, ["2", "1", "2", "c", "d", "0"]])
    write(tmp_path / "QQP/dev.tsv", [header, ["0", "1", "2", "a", "b", "0"]])
    return tmp_path / "QQP/train.tsv"


def test_malformed_rows_fail_or_are_skipped_and_counted(tmp_path: Path) -> None:
    train = qqp_files(tmp_path, ["1", "1", "2", "only question"])
    with pytest.raises(DataError, match=rf"{train}:3: malformed row \(has 4 fields, expected 6\).*skip_malformed"):
        load(Qqp, tmp_path)
    task = Qqp(GlueConfig(data_dir=str(tmp_path), skip_malformed=True))
    d = task.load()
    assert len(d["train"]) == 2 and task.load_info["files"]["train"]["skipped_malformed"] == 1
    qqp_files(tmp_path, ["1", "1", "2", "a", "", "0"])
    with pytest.raises(DataError, match=r"train.tsv:3: malformed row \(has an empty text or label field\)"):
        load(Qqp, tmp_path)


def test_bad_input_messages(tmp_path: Path) -> None:
    train = qqp_files(tmp_path, ["1", "1", "2", "a", "b", "maybe"])
    with pytest.raises(DataError, match=rf"{train}:3: label 'maybe' is not one of \['0', '1'\]"):
        load(Qqp, tmp_path)
    train.write_bytes(b"id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tcaf\xe9\tb\t1\n")
    with pytest.raises(DataError, match=rf"{train}:2: not UTF-8 \(byte 0xe9"):
        load(Qqp, tmp_path)
    write(train, [["id", "question1", "question2", "label"], ["0", "a", "b", "1"]])
    with pytest.raises(DataError, match=r"train.tsv:1: header lacks column\(s\) \['is_duplicate'\]"):
        load(Qqp, tmp_path)
    with pytest.raises(DataError, match=r"missing file .*RTE/train.tsv"):
        load(tg.Rte, tmp_path)
    with pytest.raises(DataError, match=r"set task.glue/sst2.data_dir=.* or task.glue/sst2.source=\"hub\""):
        tg.Sst2(GlueConfig()).load()
    with pytest.raises(DataError, match="source='web' is not one of"):
        tg.Sst2(GlueConfig(source="web", data_dir="x")).load()
    write(tmp_path / "STS-B/train.tsv", [["index", "sentence1", "sentence2", "score"], ["0", "a", "b", "high"]])
    with pytest.raises(DataError, match="STS-B/train.tsv:2: score 'high' is not a number"):
        load(tg.Stsb, tmp_path)


def hub_dict(names: list[str] | None, a: str, b: str | None, splits: list[str], genre: bool = False) -> datasets.DatasetDict:
    feats = {a: datasets.Value("string"),
             "label": datasets.ClassLabel(names=names) if names else datasets.Value("float32")}
    data: dict[str, list[Any]] = {a: ["x", "y"], "label": [0, 1]}
    if b:
        feats[b], data[b] = datasets.Value("string"), ["p", "q"]
    if genre:
        feats["genre"], data["genre"] = datasets.Value("string"), ["slate", "nineeleven"]
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(data, features=datasets.Features(feats))
                                 for s in splits})


def test_hub_source_calls_load_dataset_with_glue_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake(*args: Any, **kw: Any) -> datasets.DatasetDict:
        calls.append(args)
        if args == ("nyu-mll/multi_nli",):
            return hub_dict(list(Mnli.label_names), "premise", "hypothesis",
                            ["train", "validation_matched", "validation_mismatched"], genre=True)
        if args == ("nyu-mll/glue", "mnli"):
            return hub_dict(list(Mnli.label_names), "premise", "hypothesis", ["test_matched", "test_mismatched"])
        return hub_dict(["negative", "positive"], "sentence", None, ["train", "validation", "test"])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    d = tg.Sst2(GlueConfig(source="hub")).load()
    assert calls == [("nyu-mll/glue", "sst2")] and set(d) == {"train", "dev", "test"}
    assert d["dev"][0] == {"text_a": "x", "label": 0}
    m = Mnli(GlueConfig(source="hub")).load()
    assert calls[1:] == [("nyu-mll/multi_nli",), ("nyu-mll/glue", "mnli")]
    assert m["train"]["domain"] == [2, -1] and m["train"]["text_b"] == ["p", "q"]
    assert set(m) == {"train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"}
    with pytest.raises(DataError, match="hub dataset for glue/rte has labels"):
        tg.Rte(GlueConfig(source="hub")).load()  # fake returns sst2 label names


def test_hub_failure_is_a_data_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*a: Any, **k: Any) -> None:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load nyu-mll/glue/cola \(ConnectionError: offline\).*source=\"local\""):
        tg.Cola(GlueConfig(source="hub")).load()


def test_write_glue_submission(tmp_path: Path) -> None:
    (p,) = write_glue_submission(tg.Sst2, [1, 0, 1], tmp_path)
    assert p.name == "SST-2.tsv" and p.read_text() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"
    m, mm = write_glue_submission(Mnli(), {"test_matched": [0, 2], "test_mismatched": [1]}, tmp_path)
    assert (m.name, mm.name) == ("MNLI-m.tsv", "MNLI-mm.tsv")
    assert m.read_text().splitlines() == ["index\tprediction", "0\tentailment", "1\tcontradiction"]
    (r,) = write_glue_submission(tg.Rte, [1], tmp_path)
    assert r.read_text().splitlines()[1] == "0\tnot_entailment"
    (s,) = write_glue_submission(tg.Stsb, [5.7, 2.34567], tmp_path)
    assert s.read_text().splitlines()[1:] == ["0\t5.000", "1\t2.346"]
    with pytest.raises(ValueError, match="need predictions for"):
        write_glue_submission(Mnli, [0, 1], tmp_path)
    with pytest.raises(ValueError, match="class ids 0..1"):
        write_glue_submission(tg.Cola, [2], tmp_path)


def test_metrics_and_registration() -> None:
    import torch

    mrpc = tg.Mrpc(GlueConfig())
    out = mrpc.compute_metrics(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0]), "dev")
    assert out == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.75)}
    assert mrpc.compute_metrics(torch.tensor([1]), torch.tensor([-1]), "test") == {}
    registered: list[Any] = []
    tg.kdbench_register_tasks(registered.append)
    assert [c.name for c in registered] == [f"glue/{n}" for n in
                                            ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")]
    for c in registered:
        assert c.version and c.metrics and c.num_labels and c.sources == ("local", "hub")
    assert Mnli.eval_splits == ("dev_matched", "dev_mismatched") and Mnli.domains == tg.MNLI_GENRES
