"""Set-ups that measure the methods: the checkpoint's own read-out, a held-out selection split,
regression heads at the mean label, Meta-KD's stage-2 budget, MetaDistil's quiz size."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kdbench.contract.errors import ConfigError, DataError
from kdbench.contract.spec import TrainConfig
from kdbench.engine.config import build_config, load_suite, train_for_task
from kdbench.engine.data import prepare_data
from kdbench.engine.manager import Host
from kdbench.engine.plan import expand
from kdbench.testing import tiny_suite
from kdbench_builtins.models_text import HFConfig, HFModel, char_tokenizer, resolve_pooling
from kdbench_builtins.students import PickLayers, PickLayersConfig
from kdbench_builtins.tasks_toy import Reviews, ReviewsConfig


def _checkpoint(path: Path, pooling: dict[str, bool] | None) -> Path:
    """A tiny 4-layer BERT encoder; with ``pooling``, in the sentence-transformers layout."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=160, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(3)
    BertModel(cfg).save_pretrained(path)
    char_tokenizer(64).save_pretrained(path)
    if pooling is not None:
        (path / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 16, "pooling_mode_cls_token": False,
             "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False, **pooling}))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"mean": _checkpoint(root / "mean", {"pooling_mode_mean_tokens": True}),
            "cls_mode": _checkpoint(root / "cls_mode", {"pooling_mode_cls_token": True}),
            "plain": _checkpoint(root / "plain", None)}


def test_auto_pooling_follows_the_checkpoint(checkpoints: dict[str, Path]) -> None:
    assert resolve_pooling("auto", str(checkpoints["mean"])) == "mean"
    assert resolve_pooling("auto", str(checkpoints["cls_mode"])) == "cls"
    assert resolve_pooling("auto", str(checkpoints["plain"])) == "cls"
    assert resolve_pooling("auto", "") == "cls"  # tiny-bert: no checkpoint
    assert resolve_pooling("cls", str(checkpoints["mean"])) == "cls"  # explicit choices stay
    assert resolve_pooling("mean", str(checkpoints["plain"])) == "mean"
    with pytest.raises(ConfigError, match="use one of 'auto', 'cls', 'mean'"):
        resolve_pooling("avg", str(checkpoints["plain"]))


@pytest.mark.parametrize(("name", "want"), [("mean", "mean"), ("plain", "cls")])
def test_teacher_and_picked_student_resolve_auto(checkpoints: dict[str, Path], name: str, want: str) -> None:
    teacher_kind = HFModel(HFConfig(checkpoint=str(checkpoints[name])))
    teacher = teacher_kind.build(2, torch.Generator().manual_seed(0))
    student = PickLayers(PickLayersConfig(layers=2, pick="skip")).build(
        teacher_kind, 2, torch.Generator().manual_seed(0))
    assert teacher.pooling == want and student.pooling == want
    assert student.picked_layers == (1, 3)
    # the teacher's explicit choice does not decide the student's "auto"
    cls_teacher = HFModel(HFConfig(checkpoint=str(checkpoints[name]), pooling="cls"))
    assert PickLayers(PickLayersConfig(layers=1)).build(
        cls_teacher, 2, torch.Generator().manual_seed(0)).pooling == want


def test_shared_minilm_resolves_to_mean() -> None:
    hub = Path(__file__).resolve().parents[1].parent / "shared" / "hf" / "hub"
    hub = hub if hub.is_dir() else Path("/work/shared/hf/hub")
    if not (hub / "models--sentence-transformers--all-MiniLM-L6-v2").is_dir():
        pytest.skip("shared HF cache absent")
    kw = {"local_files_only": True, "cache_dir": str(hub)}
    assert resolve_pooling("auto", "sentence-transformers/all-MiniLM-L6-v2", kw) == "mean"


# -- held-out selection split ------------------------------------------------------------------


def _reviews(**kw: Any) -> Reviews:
    return Reviews(ReviewsConfig(per_domain=100, **kw))


def test_heldout_is_carved_from_train_stratified_and_seeded() -> None:
    tok = char_tokenizer(32)
    base = prepare_data(_reviews(), tokenizer=tok)
    a = prepare_data(_reviews(heldout_fraction=0.25), tokenizer=tok, seed=1)
    again = prepare_data(_reviews(heldout_fraction=0.25), tokenizer=tok, seed=1)
    other = prepare_data(_reviews(heldout_fraction=0.25), tokenizer=tok, seed=2)
    n = len(base.splits["train"])
    held = a.splits["heldout"]
    assert len(held) == round(0.25 * n) and len(a.splits["train"]) == n - len(held)
    assert "heldout" not in base.splits and base.info["heldout"]["rows"] == 0
    assert a.info["heldout"]["rows"] == len(held) and a.fingerprint != base.fingerprint
    # same rows for the same seed, other rows for another seed, disjoint from train
    assert torch.equal(held.tensors["input_ids"], again.splits["heldout"].tensors["input_ids"])
    assert not torch.equal(held.tensors["labels"], other.splits["heldout"].tensors["labels"]) or \
        not torch.equal(held.tensors["input_ids"], other.splits["heldout"].tensors["input_ids"])
    rows = lambda s: {tuple(r[m.bool()].tolist()) for r, m in  # noqa: E731
                      zip(s.tensors["input_ids"], s.tensors["attention_mask"], strict=True)}
    full = rows(base.splits["train"])
    assert rows(held) <= full and rows(a.splits["train"]) <= full
    assert len(rows(held) & rows(a.splits["train"])) < len(rows(held))  # (toy texts repeat)
    frac = held.tensors["labels"].float().mean()
    assert abs(frac - base.splits["train"].tensors["labels"].float().mean()) < 0.05  # stratified


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.9])
def test_heldout_fraction_is_validated(bad: float) -> None:
    with pytest.raises(DataError, match="heldout_fraction"):
        prepare_data(_reviews(heldout_fraction=bad), tokenizer=char_tokenizer(32))


def test_select_resolution_at_plan_time() -> None:
    problems: list[str] = []
    with_heldout = ReviewsConfig(heldout_fraction=0.2)
    assert train_for_task(TrainConfig(), Reviews, with_heldout, "train", problems).select == "heldout"
    assert train_for_task(TrainConfig(), Reviews, ReviewsConfig(), "train", problems).select == ""
    assert not problems
    train_for_task(TrainConfig(select="heldout"), Reviews, ReviewsConfig(), "train", problems)
    train_for_task(TrainConfig(select="devv"), Reviews, ReviewsConfig(), "train", problems)
    assert "heldout_fraction > 0" in problems[0] and "did you mean 'dev'" in problems[1].lower()
    # label_mean_bias acts only on regression: resolved False for classification
    assert not train_for_task(TrainConfig(), Reviews, ReviewsConfig(), "train", []).label_mean_bias
    assert TrainConfig().label_mean_bias


def test_heldout_selects_and_dev_is_reported(make_host: Callable[..., Host], run_tiny: Any) -> None:
    result = run_tiny(make_host(), "kd", steps=0, overrides=[
        "train.epochs=3", "task.toy/reviews.per_domain=100", "task.toy/reviews.heldout_fraction=0.2",
        "teacher_train.max_steps=4"])
    assert result["status"] == "ok", result.get("reason")
    assert result["config"]["train"]["select"] == "heldout"
    assert result["protocol"]["selection"] == "heldout/accuracy"
    m = result["metrics"]
    assert {"heldout/accuracy", "dev/accuracy"} <= set(m["best"])
    hist = result["history"]
    best = max(range(len(hist)), key=lambda i: (hist[i]["heldout/accuracy"], -i))
    on_dev = max(range(len(hist)), key=lambda i: (hist[i]["dev/accuracy"], -i))
    assert result["protocol"]["best_epoch"] == best and result["protocol"]["best_on_dev_epoch"] == on_dev
    assert m["best_on_dev"]["dev/accuracy"] == hist[on_dev]["dev/accuracy"]
    assert m["last"]["dev/accuracy"] == hist[-1]["dev/accuracy"]
    assert result["teacher"]["protocol"]["selection"] == "heldout/accuracy"  # teachers too
    assert result["data"]["heldout"]["rows"] > 0


def test_heldout_changes_only_the_ids_that_use_it(tmp_path: Path, make_host: Callable[..., Host]) -> None:
    host = make_host()
    path = str(tiny_suite(tmp_path / "s.toml", "kd"))
    base = {c.run_id for c in expand(load_suite(path), host)}
    assert {c.run_id for c in expand(load_suite(path, ["task.toy/reviews.heldout_fraction=0.0"]), host)} == base
    held = {c.run_id for c in expand(load_suite(path, ["task.toy/reviews.heldout_fraction=0.1"]), host)}
    assert not held & base


# -- Meta-KD stage budget; MetaDistil quiz size -------------------------------------------------


def test_meta_kd_stage2_budget() -> None:
    from kdbench_builtins.metakd import MetaKDLoss, MetaKDLossConfig
    from kdbench_builtins.models_text import TinyBert, TinyBertConfig
    from kdbench_builtins.tasks_toy import Reviews as Task

    teacher = TinyBert(TinyBertConfig(layers=2)).build(2, torch.Generator().manual_seed(0))
    student = TinyBert(TinyBertConfig(layers=1)).build(2, torch.Generator().manual_seed(1))

    def loss(**kw: Any) -> MetaKDLoss:
        return MetaKDLoss(MetaKDLossConfig(**kw), task=Task(None), teacher=teacher, student=student)

    ref = loss()
    assert MetaKDLossConfig().stage2_epochs == 10  # EasyNLP's second 10-epoch run
    assert ref.num_epochs(6) == 13 and ref.stages(13) == (3,)
    ref.begin_epoch(2, 13)
    assert ref.stage == 1
    ref.begin_epoch(3, 13)
    assert ref.stage == 2
    fixed = loss(stage1_epochs=2, stage2_epochs=4)
    assert fixed.num_epochs(99) == 6 and fixed.stages(6) == (2,)
    legacy = loss(stage2_epochs=-1)
    assert legacy.num_epochs(6) == 6 and legacy.stages(6) == (3,)
    problems: list[str] = []  # below -1 is a plan-time error (kdbench run never builds the loss)
    build_config(MetaKDLossConfig, [{"stage2_epochs": -2}], "[loss.meta-kd]", problems)
    assert problems == ["[loss.meta-kd]: stage2_epochs = -2 must be >= -1"]


def test_metadistil_quiz_batches_zero_is_the_whole_quiz_split(make_host: Callable[..., Host],
                                                             run_tiny: Any) -> None:

    with pytest.raises(ConfigError, match="quiz_batches = -1 must be >= 0"):  # at plan time
        run_tiny(make_host(), "metadistil", steps=2, overrides=["teacher_update.metadistil.quiz_batches=-1"])
    result = run_tiny(make_host(), "metadistil", steps=2, overrides=[
        "teacher_update.metadistil.quiz_batches=0", "task.toy/reviews.per_domain=100"])
    assert result["status"] == "ok", result.get("reason")
    quiz = result["data"]["rows"]["quiz"]
    last = result["extra"]["last_metrics"]
    assert last["prepare/teacher/quiz_batches"] == -(-quiz // 16)  # batch_size 16
    assert last["prepare/teacher/quiz_examples_per_update"] == quiz
