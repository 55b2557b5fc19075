"""Amazon multi-domain reviews: Meta-KD splits, parsing, checksummed download."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedKFold

from kdbench.contract.errors import DataError
from kdbench_builtins import tasks_amazon as ta
from kdbench_builtins.tasks_amazon import (
    AmazonConfig,
    download_archive,
    meta_kd_splits,
    read_reviews,
    verify_sha256,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ACL = SHARED / "data" / "amazon_blitzer" / "sorted_data_acl"
needs_acl = pytest.mark.skipif(not ACL.is_dir(), reason="../shared/data/amazon_blitzer absent")
TASKS = (ta.Books, ta.Dvd, ta.Electronics, ta.Kitchen)


def review(text_lines: list[str]) -> str:
    return "<review>\n<rating>\n5.0\n</rating>\n<review_text>\n" + "\n".join(text_lines) + "\n</review_text>\n</review>\n"


def test_splits_equal_easynlp_procedure() -> None:
    """Same rows as EasyNLP's generate_senti_data.py (pandas sample + StratifiedKFold on frames)."""
    sentiment = np.array(([1] * 1000 + [0] * 1000) * 4)  # books..kitchen, positive then negative
    df = pd.DataFrame({"row": np.arange(8000), "sentiment": sentiment}).sample(frac=1.0, random_state=11111)
    skf = StratifiedKFold(n_splits=10, random_state=11111, shuffle=True)
    tr_idx, te_idx = next(iter(skf.split(df, df["sentiment"])))
    raw_tr, te = df.iloc[tr_idx], df.iloc[te_idx]
    tr_idx, va_idx = next(iter(skf.split(raw_tr, raw_tr["sentiment"])))
    ours = meta_kd_splits(sentiment)
    assert ours["train"].tolist() == raw_tr.iloc[tr_idx]["row"].tolist()
    assert ours["dev"].tolist() == raw_tr.iloc[va_idx]["row"].tolist()
    assert ours["test"].tolist() == te["row"].tolist()
    assert [len(ours[s]) for s in ("train", "dev", "test")] == [6480, 720, 800]
    with pytest.raises(DataError, match=r"only \[10, 10\] negative/positive reviews"):
        meta_kd_splits(np.array([0, 1] * 10))


@needs_acl
def test_real_sizes_and_domains() -> None:
    totals = {"train": 0, "dev": 0, "test": 0}
    for d_id, cls in enumerate(TASKS):
        task = cls(AmazonConfig(data_dir=str(ACL)))
        d = task.load()
        assert task.load_info["total_reviews"] == 8000
        assert set(task.load_info["reviews_per_file"].values()) == {1000}
        for s in totals:
            assert set(d[s]["domain"]) == {d_id}  # own domain only, every domain in every split
            totals[s] += len(d[s])
        meta = d["meta_train"]
        assert len(meta) == 6480 and sorted(set(meta["domain"])) == [0, 1, 2, 3]
        assert sorted(set(meta["label"])) == [0, 1] and sum(meta["label"]) == 3240
    assert totals == {"train": 6480, "dev": 720, "test": 800}


@needs_acl
def test_real_text_extraction() -> None:
    texts = read_reviews(ACL / "books" / "positive.review")
    assert len(texts) == 1000
    assert texts[0].startswith("Sphere by Michael Crichton is an excellant novel. This was certainly")
    assert "\t" not in "".join(texts) and all(t == t.strip() for t in texts)


def test_read_reviews_format_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "positive.review"
    f.write_text(review(["First line.", "", "\tSecond\tline. "]) + review(["Only"]), encoding="utf-8")
    assert read_reviews(f) == ["First line. Second line.", "Only"]
    f.write_text(review(["a"]) + "<review>\n<review_text>\nnever closed\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{f}:10: <review_text> never closed"):
        read_reviews(f)
    f.write_text("<review_text>\n<review_text>\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":2: <review_text> opened again"):
        read_reviews(f)
    f.write_bytes(b"<review_text>\ncaf\xe9\n</review_text>\n")
    with pytest.raises(DataError, match=rf"{f}:2: not UTF-8 \(byte 0xe9\)"):
        read_reviews(f)
    f.write_text("<review>\n</review>\n", encoding="utf-8")
    with pytest.raises(DataError, match="no <review_text> blocks"):
        read_reviews(f)
    with pytest.raises(DataError, match=r"missing file .*nope.review; data_dir must be the sorted_data_acl"):
        read_reviews(tmp_path / "nope.review")


def test_config_errors() -> None:
    with pytest.raises(DataError, match=r"set task.amazon/books.data_dir=.*source=\"download\""):
        ta.Books(AmazonConfig()).load()
    with pytest.raises(DataError, match="source='hub' is not one of"):
        ta.Books(AmazonConfig(source="hub", data_dir="x")).load()


def fake_archive(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tar.gz with the 8 labelled files (tiny) plus an unlabeled file and a path-escape attempt."""
    pins: dict[str, str] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in ta.DOMAINS:
            for pol in ("positive", "negative"):
                rel = f"{ta.FOLDERS[d]}/{pol}.review"
                data = "".join(review([f"{d} {pol} {i}"]) for i in range(6)).encode()
                pins[rel] = hashlib.sha256(data).hexdigest()
                info = tarfile.TarInfo(f"sorted_data/{rel}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        for name in ("sorted_data/books/unlabeled.review", "../evil.review"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    path = tmp_path / "fake.tar.gz"
    path.write_bytes(buf.getvalue())
    return path, pins


def test_verify_sha256(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    verify_sha256(f, hashlib.sha256(b"hello").hexdigest().upper())
    with pytest.raises(DataError, match=r"a.bin: sha256 2cf24d.* does not match the expected 00ff; the file was deleted"):
        verify_sha256(f, "00ff")
    assert not f.exists()


def test_download_archive_verifies_checksums(tmp_path: Path) -> None:
    archive, pins = fake_archive(tmp_path)
    url = archive.resolve().as_uri()  # file:// - the real code path, no network
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = download_archive(url, tmp_path / "dl", archive_sha256=digest, file_sha256=pins)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.review")) == sorted(pins)
    assert not (tmp_path / "evil.review").exists() and not (root / "books/unlabeled.review").exists()
    assert read_reviews(root / "dvd/negative.review") == [f"dvd negative {i}" for i in range(6)]
    d = ta.Dvd(AmazonConfig(data_dir=str(root))).load()
    assert sum(len(d[s]) for s in ("train", "dev", "test")) == 12  # dvd's 6 + 6 reviews
    assert len(d["meta_train"]) == len(meta_kd_splits(np.array(([1] * 6 + [0] * 6) * 4))["train"])
    with pytest.raises(DataError, match="does not match the expected"):
        download_archive(url, tmp_path / "dl2", archive_sha256="0" * 64, file_sha256=pins)
    assert not (tmp_path / "dl2" / "domain_sentiment_data.tar.gz").exists()
    bad = dict(pins, **{"dvd/negative.review": "1" * 64})
    with pytest.raises(DataError, match=r"dvd/negative.review: sha256 .* does not match"):
        download_archive(url, tmp_path / "dl3", file_sha256=bad)
    with pytest.raises(DataError, match="could not download"):
        download_archive((tmp_path / "missing.tar.gz").as_uri(), tmp_path / "dl4", file_sha256=pins)


def test_registration() -> None:
    reg: list[type] = []
    ta.kdbench_register_tasks(reg.append)
    assert [c.name for c in reg] == ["amazon/books", "amazon/dvd", "amazon/electronics", "amazon/kitchen"]
    assert all(c.domains == ("books", "dvd", "electronics", "kitchen") and c.sources for c in reg)
