"""Every registered method runs end to end through the shared loop on text, vision and regression."""

from __future__ import annotations

import pytest

from kdbench.engine.manager import Host

METHODS = ["kd", "pkd-skip", "pkd-last", "metadistil", "metadistil-pkd", "metadistil-adam", "reptile-distil", "meta-kd", "no-kd"]
# (status on toy/reviews (text, 3 domains), status on toy/digits (vision))
EXPECTED = {"pkd-skip": ("ok", "n-a"), "pkd-last": ("ok", "n-a"), "metadistil-pkd": ("ok", "n-a"),
            "meta-kd": ("ok", "n-a")}  # reptile maps resnet14 -> resnet8 blocks of equal shape


@pytest.fixture(scope="module")
def host() -> Host:
    return Host.create(autoload=False)


def test_every_builtin_method_is_covered(host):
    assert set(METHODS) == set(host.methods.names())


@pytest.mark.parametrize("method", METHODS)
def test_text(host, run_tiny, method):
    r = run_tiny(host, method, "toy/reviews", steps=6, overrides=["students.bert-l1.layers=2"])
    assert r["status"] == EXPECTED.get(method, ("ok", "ok"))[0], r.get("reason")
    assert 0.0 <= r["metrics"]["best"]["dev/accuracy"] <= 1.0
    assert r["protocol"]["steps"] == 6 and r["history"]


@pytest.mark.parametrize("method", METHODS)
def test_vision(host, run_tiny, method):
    r = run_tiny(host, method, "toy/digits", steps=4)
    want = EXPECTED.get(method, ("ok", "ok"))[1]
    assert r["status"] == want, r.get("reason")
    if want == "n-a":
        assert r["reason"]
    else:
        assert r["metrics"]["best"]["dev/accuracy"] >= 0.0


@pytest.mark.parametrize("method", METHODS)
def test_regression_stsb(host, run_tiny, method, shared_dir):
    r = run_tiny(host, method, "glue/stsb", steps=4, overrides=[
        f'task."glue/stsb".data_dir="{shared_dir / "data" / "glue"}"', 'task."glue/stsb".max_train_examples=200',
        'task."glue/stsb".max_seq_length=48', "students.bert-l1.layers=2"])
    if method == "meta-kd":
        assert r["status"] == "n-a" and "domain" in r["reason"]
        return
    assert r["status"] == "ok", r.get("reason")
    assert {"dev/pearson", "dev/spearmanr"} <= set(r["metrics"]["best"])


@pytest.mark.parametrize("flag", [False, True])
def test_label_mean_bias_starts_the_regression_head_at_the_label_mean(host, run_tiny, shared_dir, flag):
    r = run_tiny(host, "kd", "glue/stsb", steps=2, overrides=[
        f'task."glue/stsb".data_dir="{shared_dir / "data" / "glue"}"', 'task."glue/stsb".max_train_examples=200',
        'task."glue/stsb".max_seq_length=48', f"train.label_mean_bias={str(flag).lower()}"])
    assert r["status"] == "ok", r.get("reason")
    got = r["extra"]["last_metrics"].get("init/label_mean_bias")
    assert (got is not None) == flag
    if flag:  # STS-B scores lie in [0, 5] and average about 2.7
        assert 2.0 < got < 3.5
        assert r["config"]["train"]["label_mean_bias"] is True


def test_best_epoch_selected_on_quiz_split(host, run_tiny):
    r = run_tiny(host, "kd", "toy/digits", steps=4, overrides=["train.select=quiz"])
    assert r["status"] == "ok" and r["protocol"]["selection"] == "quiz/accuracy"
    assert {"quiz/accuracy", "dev/accuracy"} <= set(r["metrics"]["best"])
