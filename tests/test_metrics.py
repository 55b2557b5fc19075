"""kdbench.contract.metrics: evaluate modules loaded by path, equal to scikit-learn / scipy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import kdbench.contract.metrics as km

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def test_accuracy_matches_sklearn() -> None:
    p, r = RNG.integers(0, 3, 300), RNG.integers(0, 3, 300)
    assert km.compute("accuracy", p, r) == pytest.approx(accuracy_score(r, p), abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_matthews_matches_sklearn(k: int) -> None:
    p, r = RNG.integers(0, k, 257), RNG.integers(0, k, 257)
    p[:100] = r[:100]  # some signal
    assert km.compute("matthews_correlation", p, r) == pytest.approx(matthews_corrcoef(r, p), abs=1e-12)


def test_matthews_constant_prediction_is_zero_like_sklearn() -> None:
    r = RNG.integers(0, 2, 50)
    p = np.ones(50, dtype=int)
    assert km.compute("matthews_correlation", p, r) == matthews_corrcoef(r, p) == 0.0


def test_f1_matches_sklearn_including_zero_division() -> None:
    p, r = RNG.integers(0, 2, 300), RNG.integers(0, 2, 300)
    assert km.compute("f1", p, r) == pytest.approx(f1_score(r, p), abs=1e-12)
    zeros = np.zeros(10, dtype=int)
    assert km.compute("f1", zeros, zeros) == f1_score(zeros, zeros, zero_division=0) == 0.0


def test_correlations_match_scipy_with_ties() -> None:
    x = RNG.normal(size=200)
    y = x + RNG.normal(size=200)
    x[:30] = 1.0  # ties
    y[50:80] = np.round(y[50:80])
    assert km.compute("pearson", x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert km.compute("pearsonr", x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert km.compute("spearmanr", x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def test_accepts_tensors_and_score_skips_unlabelled_rows() -> None:
    preds = torch.tensor([1, 0, 1, 1])
    labels = torch.tensor([1, 1, -1, -1])
    assert km.score(("accuracy", "f1"), preds, labels) == {
        "accuracy": pytest.approx(0.5), "f1": pytest.approx(f1_score([1, 1], [1, 0]))}
    assert km.score(("accuracy",), preds, torch.full((4,), -1)) == {}


def test_shared_correlation_helpers() -> None:
    from kdbench.contract.metrics.module import average_ranks, pearson, spearman

    assert average_ranks([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    x, y = RNG.normal(size=50), RNG.normal(size=50)
    assert spearman(x, y) == pytest.approx(pearson(average_ranks(x), average_ranks(y)), abs=1e-15)
    assert np.isnan(pearson([1.0, 1.0], [0.0, 2.0])) and np.isnan(spearman([2, 2, 2], [1, 2, 3]))
    assert km.load("spearmanr").info.features["predictions"].dtype == "float64"
    assert km.load("f1").info.features["references"].dtype == "int64"


def test_unknown_metric_and_length_mismatch() -> None:
    with pytest.raises(KeyError, match="unknown metric 'bleu'"):
        km.compute("bleu", [1], [1])
    with pytest.raises(ValueError, match="2 predictions vs 3 references"):
        km.compute("accuracy", [1, 0], [1, 0, 1])


def test_evaluate_load_by_path_works_offline(tmp_path: Path) -> None:
    """A fresh process with the Hub switched off loads every module from its folder."""
    code = (
        "import evaluate, kdbench.contract.metrics as km\n"
        "for name in sorted({v[0] for v in km.METRICS.values()}):\n"
        "    m = evaluate.load(str(km.module_path(name)))\n"
        "    assert type(m).__module__.endswith(name), type(m).__module__\n"
        "    assert type(m).__name__ != 'KdbenchMetric' and m.info.features, type(m)\n"
        "print(km.compute('accuracy', [1, 0, 1, 1], [1, 0, 0, 1]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.75"
