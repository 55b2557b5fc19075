"""kdbench.engine.data: TensorSplit batching, carving, validation, tokenisation and its cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
import torch

import kdbench.engine.tokens as kd
from kdbench.contract.errors import DataError, PluginError
from kdbench.contract.taskopts import DataOptions, SourceOptions, TextDataOptions, data_options
from kdbench.contract.tensors import TensorSplit, stratified_choice
from kdbench.contract.types import NoConfig, Task
from kdbench.engine.data import prepare_data
from kdbench_builtins.tasks_toy import REVIEW_DOMAINS, Digits, DigitsConfig, Reviews, ReviewsConfig

torch.set_num_threads(1)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HF = SHARED / "hf"
needs_hf = pytest.mark.skipif(not (HF / "hub").is_dir(), reason="../shared/hf (MiniLM tokenizer) absent")


@pytest.fixture(scope="module")
def tok() -> Any:
    if not (HF / "hub").is_dir():
        pytest.skip("../shared/hf absent")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2",
                                         cache_dir=str(HF / "hub"), local_files_only=True)


@dataclass(frozen=True)
class FakeCfg(TextDataOptions):
    max_seq_length: int = 16


class FakeText(Task):
    """In-memory text task; ``splits`` set per test."""

    name = "test/fake"
    num_labels = 3

    def __init__(self, cfg: Any, splits: dict[str, dict[str, list[Any]]]) -> None:
        super().__init__(cfg)
        self.splits = splits
        self.load_info = {"files": {s: {"file": f"/data/{s}.tsv"} for s in splits}}
        self.calls = 0

    def load(self) -> dict[str, datasets.Dataset]:
        self.calls += 1
        return {s: datasets.Dataset.from_dict(d) for s, d in self.splits.items()}


def fake_splits(n: int = 60) -> dict[str, dict[str, list[Any]]]:
    words = ["alpha", "beta", "gamma delta", "the quick brown fox jumps", "a"]
    tr = {"text_a": [words[i % 5] * (1 + i % 3) for i in range(n)], "label": [i % 3 for i in range(n)]}
    dev = {"text_a": ["beta", "alpha gamma"], "label": [0, 2]}
    return {"train": tr, "dev": dev}


def make_split(lengths: list[int], width: int = 6) -> TensorSplit:
    n = len(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # (N, T)
    ids = torch.arange(n * width).view(n, width) * mask
    t = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
         "labels": torch.arange(n) % 2, "index": torch.arange(n), "domain": torch.arange(n) % 3}
    return TensorSplit("train", t, ("input_ids", "attention_mask", "token_type_ids"))


# -- TensorSplit ---------------------------------------------------------------------------


def test_batches_sequential_dynamic_padding_and_counts() -> None:
    s = make_split([2, 3, 6, 1, 4])
    assert len(s) == 5 and s.num_batches(2) == 3 and s.num_batches(2, drop_last=True) == 2
    bs = list(s.batches(2))
    assert [b.inputs["input_ids"].shape for b in bs] == [(2, 3), (2, 6), (1, 4)]
    assert bs[0].index.tolist() == [0, 1] and bs[2].domain.tolist() == [1]
    assert len(list(s.batches(2, drop_last=True))) == 2
    assert torch.equal(bs[1].inputs["input_ids"], s.tensors["input_ids"][2:4])


def test_batches_order_and_resume() -> None:
    s = make_split([2, 3, 6, 1, 4])
    order = torch.tensor([3, 0, 4, 1, 2])
    bs = list(s.batches(2, order=order))
    assert [b.index.tolist() for b in bs] == [[3, 0], [4, 1], [2]]
    assert bs[0].inputs["input_ids"].shape == (2, 2)  # lengths 1 and 2
    resumed = list(s.batches(2, order=order, start=1))
    assert [b.index.tolist() for b in resumed] == [[4, 1], [2]]
    with pytest.raises(ValueError, match="order has 3 entries"):
        next(s.batches(2, order=torch.tensor([0, 1, 2])))


def padded_tokens(s: TensorSplit, order: torch.Tensor, batch_size: int) -> int:
    return sum(b.inputs["input_ids"].numel() for b in s.batches(batch_size, order=order))


def test_length_bucketing_groups_similar_lengths_deterministically() -> None:
    lengths = torch.randint(1, 65, (203,), generator=torch.Generator().manual_seed(1)).tolist()
    s = make_split(lengths, width=64)
    order = torch.randperm(203, generator=torch.Generator().manual_seed(2))
    out = s.bucketed(order, 8, 5, torch.Generator().manual_seed(3))
    assert sorted(out.tolist()) == list(range(203))  # still a permutation
    assert padded_tokens(s, out, 8) < 0.75 * padded_tokens(s, order, 8)
    assert torch.equal(out, s.bucketed(order, 8, 5, torch.Generator().manual_seed(3)))  # pure
    assert not torch.equal(out, s.bucketed(order, 8, 5, torch.Generator().manual_seed(4)))
    assert set(out[-3:].tolist()) <= set(order[200:].tolist())  # the 3-row remainder stays last
    # each window of 5 batches holds the same rows as before, only regrouped
    first = set(order[:40].tolist())
    assert sum(set(b) <= first for b in out[:200].view(-1, 8).tolist()) == 5
    assert torch.equal(s.bucketed(order, 8, 0, torch.Generator()), order)  # 0 = off
    image = TensorSplit("train", {"pixel_values": torch.zeros(4, 3, 2, 2), "labels": torch.zeros(4),
                                  "index": torch.arange(4)}, ("pixel_values",))
    assert torch.equal(image.bucketed(order[:4] % 4, 2, 5, torch.Generator()), order[:4] % 4)


def test_subset_reindexes_and_trims() -> None:
    s = make_split([2, 3, 6, 1, 4])
    sub = s.subset(torch.tensor([4, 0]), "quiz")
    assert sub.name == "quiz" and sub.tensors["index"].tolist() == [0, 1]
    assert sub.tensors["input_ids"].shape == (2, 4)
    assert sub.tensors["labels"].tolist() == [0, 0] and sub.tensors["domain"].tolist() == [1, 0]
    assert s.to("cpu").tensors["input_ids"].shape == (5, 6)


def test_labels_known() -> None:
    s = make_split([1, 2])
    assert s.labels_known()
    s.tensors["labels"] = torch.tensor([-1, -1])
    assert not s.labels_known()


def test_stratified_choice_is_proportional_and_seeded() -> None:
    strata = np.array([0] * 70 + [1] * 20 + [2] * 10)
    a = stratified_choice(strata, 10, np.random.default_rng(1))
    b = stratified_choice(strata, 10, np.random.default_rng(1))
    assert np.array_equal(a, b) and len(a) == 10 and len(set(a)) == 10
    assert np.bincount(strata[a]).tolist() == [7, 2, 1]
    assert not np.array_equal(a, stratified_choice(strata, 10, np.random.default_rng(2)))


# -- prepare_data ---------------------------------------------------------------------------


@needs_hf
def test_prepare_text_quiz_and_tokens(tok: Any, tmp_path: Path) -> None:
    task = FakeText(FakeCfg(), fake_splits())
    td = prepare_data(task, tokenizer=tok, cache_dir=tmp_path)
    assert set(td.splits) == {"train", "quiz", "dev"}
    assert len(td.train) == 54 and len(td.quiz) == 6
    assert np.bincount(td.quiz.tensors["labels"].numpy()).tolist() == [2, 2, 2]  # stratified
    ids = td.train.tensors["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape[1] <= 16 and (ids[:, 0] == tok.cls_token_id).all()
    assert td.info["rows"] == {"train": 54, "quiz": 6, "dev": 2}
    assert td.info["quiz"]["removed_from_train_for_all_methods"] is True
    assert td.info["tokenizer"] and td.info["token_cache"] == "miss"
    assert td.info["token_lengths"]["train"]["max"] == ids.shape[1]
    # pairs: [CLS] a [SEP] b [SEP] with segment ids, longest-first truncation to 16
    pair = FakeText(FakeCfg(), {"train": {"text_a": ["a b"] * 10 + ["x " * 40] * 10, "text_b": ["c"] * 20,
                                          "label": [0, 1] * 10},
                                "dev": {"text_a": ["a"], "text_b": ["b"], "label": [0]}})
    pd_ = prepare_data(pair, tokenizer=tok)
    row = pd_.splits["dev"].tensors
    assert row["input_ids"][0].tolist() == tok("a", "b")["input_ids"]
    assert row["token_type_ids"][0].tolist() == [0, 0, 0, 1, 1]
    assert pd_.train.tensors["input_ids"].shape[1] == 16


@needs_hf
def test_token_cache_reused_then_rebuilt_when_corrupt(tok: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = FakeText(FakeCfg(), fake_splits())
    first = prepare_data(task, tokenizer=tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("tokens-*.safetensors"))
    assert len(files) == 1

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("tokenised again despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(kd, "_tokenize", boom)
        second = prepare_data(task, tokenizer=tok, cache_dir=tmp_path)
    assert second.info["token_cache"] == "hit" and second.fingerprint == first.fingerprint
    for s in first.splits:
        assert torch.equal(first.splits[s].tensors["input_ids"], second.splits[s].tensors["input_ids"])
    files[0].write_bytes(b"\x00garbage" * 10)
    third = prepare_data(task, tokenizer=tok, cache_dir=tmp_path)
    assert third.info["token_cache"] == "rebuilt"
    assert torch.equal(third.train.tensors["input_ids"], first.train.tensors["input_ids"])
    assert prepare_data(task, tokenizer=tok, cache_dir=tmp_path).info["token_cache"] == "hit"


@needs_hf
def test_fingerprint_tracks_data_and_choices(tok: Any) -> None:
    a = prepare_data(FakeText(FakeCfg(), fake_splits()), tokenizer=tok)
    b = prepare_data(FakeText(FakeCfg(quiz_fraction=0.2), fake_splits()), tokenizer=tok)
    changed = fake_splits()
    changed["dev"]["text_a"][0] = "different"
    c = prepare_data(FakeText(FakeCfg(), changed), tokenizer=tok)
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    assert a.info["raw_fingerprint"] == b.info["raw_fingerprint"] != c.info["raw_fingerprint"]


@needs_hf
def test_max_train_examples_and_regression_strata(tok: Any) -> None:
    td = prepare_data(FakeText(FakeCfg(max_train_examples=30), fake_splits()), tokenizer=tok)
    assert len(td.train) + len(td.quiz) == 30
    reg = FakeText(FakeCfg(), {"train": {"text_a": ["a"] * 50, "label": list(np.linspace(0, 5, 50))},
                               "dev": {"text_a": ["b"], "label": [1.5]}})
    reg.num_labels = 1
    rd = prepare_data(reg, tokenizer=tok)
    assert rd.train.tensors["labels"].dtype == torch.float32 and len(rd.quiz) == 5
    q = rd.quiz.tensors["labels"]
    assert q.min() < 1.5 and q.max() > 3.5  # spread over the bins


def test_bad_input_messages() -> None:
    def err(splits: dict[str, dict[str, list[Any]]]) -> str:
        with pytest.raises(DataError) as e:
            prepare_data(FakeText(FakeCfg(), splits), tokenizer=None)
        return str(e.value)

    good = fake_splits()
    assert "split 'dev' is empty (/data/dev.tsv)" in err({**good, "dev": {"text_a": [], "label": []}})
    bad = fake_splits()
    bad["dev"]["label"][1] = 7
    assert "split 'dev' (/data/dev.tsv) row 1 has label 7 outside 0..2" in err(bad)
    assert "returned no split 'dev'" in err({"train": good["train"]})
    assert "lacks column(s) ['text_a']" in err({**good, "dev": {"text": ["x"], "label": [0]}})
    mixed = fake_splits()
    mixed["train"]["label"][3] = -1
    assert "1 rows without a label (-1)" in err(mixed)
    with pytest.raises(DataError, match="no tokenizer was given"):
        prepare_data(FakeText(FakeCfg(), fake_splits()), tokenizer=None)
    with pytest.raises(DataError, match="quiz_fraction=1.0 leaves no training"):
        prepare_data(FakeText(FakeCfg(quiz_fraction=1.0), fake_splits()), tokenizer=None)


def test_unlabelled_test_split_is_allowed_but_not_for_train() -> None:
    splits = {**fake_splits(), "test": {"text_a": ["x", "y"], "label": [-1, -1]}}
    with pytest.raises(DataError, match="no tokenizer"):  # validation passed, then stops
        prepare_data(FakeText(FakeCfg(), splits), tokenizer=None)


def test_data_options_one_typed_default() -> None:
    import dataclasses

    from kdbench_builtins.tasks_amazon import AmazonConfig
    from kdbench_builtins.tasks_cifar100 import Cifar100Config
    from kdbench_builtins.tasks_glue import GlueConfig

    text = {f.name for f in dataclasses.fields(TextDataOptions)}
    assert text == {"max_seq_length", "max_train_examples", "quiz_fraction", "data_seed", "heldout_fraction"}
    # heldout_fraction (added after v1 results) stays out of run ids at its default only
    from kdbench.contract.options import identity
    assert "heldout_fraction" not in identity(GlueConfig())
    assert identity(GlueConfig(heldout_fraction=0.1))["heldout_fraction"] == 0.1
    for cfg in (GlueConfig(), AmazonConfig(), ReviewsConfig()):
        assert data_options(cfg, text=True) is cfg and isinstance(cfg, TextDataOptions)
    for vis in (Cifar100Config(), DigitsConfig()):
        assert data_options(vis, text=False) is vis and not hasattr(vis, "max_seq_length")
    for src in (GlueConfig(), AmazonConfig(), Cifar100Config()):
        assert isinstance(src, SourceOptions) and (src.source, src.data_dir) == ("local", "")
    assert data_options(NoConfig(), text=True) == TextDataOptions()  # no options: the defaults
    assert data_options(NoConfig(), text=False) == DataOptions()

    @dataclass(frozen=True)
    class Loose:  # defines a pipeline option without the typed base
        quiz_fraction: float = 0.0

    with pytest.raises(PluginError, match=r"task 'x': its Config Loose must extend kdbench.TextDataOptions \(it defines quiz_fraction\)"):
        data_options(Loose(), text=True, task="x")
    with pytest.raises(PluginError, match="must extend kdbench.TextDataOptions"):
        data_options(DigitsConfig(), text=True, task="x")  # a text task needs max_seq_length


def test_toy_digits_vision_pipeline() -> None:
    td = prepare_data(Digits(), tokenizer=None)
    px = td.train.tensors["pixel_values"]
    assert px.dtype == torch.uint8 and px.shape[1:] == (3, 16, 16)
    assert len(td.train) + len(td.quiz) == 1438 and len(td.splits["dev"]) == 359
    assert td.train.input_keys == ("pixel_values",)
    b = next(td.train.batches(8))
    x = Digits().transform(dict(b.inputs), train=True, generator=torch.Generator().manual_seed(0))
    assert x["pixel_values"].dtype == torch.float32 and x["pixel_values"].min() >= -1.0
    assert prepare_data(Digits(), tokenizer=None).fingerprint == td.fingerprint


@needs_hf
def test_toy_reviews_meta_train_excludes_every_domains_quiz_rows(tok: Any) -> None:
    from kdbench.engine.checkpoints import tensor_digest

    task = Reviews(ReviewsConfig(max_seq_length=32))
    td = prepare_data(task, tokenizer=tok)
    raw = task.load()
    assert set(td.splits) == {"train", "quiz", "dev", "test", "meta_train"}
    others = [prepare_data(Reviews(ReviewsConfig(max_seq_length=32, domain=d)), tokenizer=tok)
              for d in REVIEW_DOMAINS[1:]]
    assert len(td.splits["meta_train"]) == len(raw["meta_train"]) - len(td.quiz) - sum(len(o.quiz) for o in others)
    assert set(td.splits["meta_train"].tensors["domain"].tolist()) == {0, 1, 2}
    assert set(td.train.tensors["domain"].tolist()) == {0}
    # the same meta split whichever domain is the target: one Meta-KD meta-teacher serves all
    assert len({tensor_digest(d.splits["meta_train"].tensors) for d in [td, *others]}) == 1
    # and it holds none of the target's quiz examples
    quiz_ids = {tuple(r) for r in td.quiz.tensors["input_ids"].tolist()}
    assert not quiz_ids & {tuple(r) for r in td.splits["meta_train"].tensors["input_ids"].tolist()}
    assert "generated" in task.version and "GENERATED" in (Reviews.__doc__ or "")


def test_toy_reviews_needs_word_order_and_is_learnable() -> None:
    """Bag-of-words cannot read "not" / "but"; word n-grams can; train labels are noisy, dev clean."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from kdbench_builtins.tasks_toy import generate_reviews

    d = Reviews(ReviewsConfig(per_domain=2000)).load()

    def dev_score(ngrams: tuple[int, int]) -> float:
        vec = CountVectorizer(ngram_range=ngrams, token_pattern=r"\S+").fit(d["meta_train"]["text_a"])
        clf = LogisticRegression(max_iter=2000).fit(vec.transform(d["meta_train"]["text_a"]), d["meta_train"]["label"])
        return float(clf.score(vec.transform(d["dev"]["text_a"]), d["dev"]["label"]))

    assert dev_score((1, 1)) < 0.85 < dev_score((1, 3))
    clean = generate_reviews(2000)["label"]
    assert np.array_equal(np.asarray(d["dev"]["label"]), clean[np.asarray(d["dev"]["row_id"])])
    flipped = np.mean(np.asarray(d["meta_train"]["label"]) != clean[np.asarray(d["meta_train"]["row_id"])])
    assert flipped == pytest.approx(ReviewsConfig().label_noise, abs=0.002)


def test_toy_digits_is_harder_than_raw_digits() -> None:
    """Shift and pixel noise keep a linear model well below raw digits; dev labels stay clean."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = Digits().load()
    x = {s: np.asarray(d[s]["image"], np.float32).reshape(len(d[s]), -1) / 255 for s in ("train", "dev")}
    acc = LogisticRegression(max_iter=300).fit(x["train"], d["train"]["label"]).score(x["dev"], d["dev"]["label"])
    assert 0.3 < acc < 0.9
    clean = Digits(DigitsConfig(label_noise=0.0)).load()
    assert d["dev"]["label"] == clean["dev"]["label"]  # dev labels are never flipped
    flipped = np.mean(np.asarray(d["train"]["label"]) != np.asarray(clean["train"]["label"]))
    assert flipped == pytest.approx(DigitsConfig().label_noise, abs=0.001)
    assert np.array_equal(np.asarray(clean["train"]["image"]), np.asarray(d["train"]["image"]))
    assert sorted(set(clean["train"]["label"])) == sorted(set(load_digits().target.tolist()))
    with pytest.raises(DataError, match="label_noise=0.6 must be in"):
        Digits(DigitsConfig(label_noise=0.6)).load()
