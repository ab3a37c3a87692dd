"""scikit-learn pipelines converted with skl2onnx: the scikit-learn rows of issue 22's table.

Rebuild (from the repository root; a venv of its own, outside the checkout, never torch)::

    python3.11 -m venv /tmp/venv-skl
    /tmp/venv-skl/bin/pip install scikit-learn==1.9.1 skl2onnx==1.20.0 scipy==1.17.1 \
        onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6
    /tmp/venv-skl/bin/python models/producers/make_sklearn.py

or, for the whole environment exactly as it was (``pip freeze`` of the one that built the files),
``/tmp/venv-skl/bin/pip install -r models/producers/requirements-sklearn.txt``.

Each pipeline is fitted on a small seeded synthetic data set (12 features with different means
and scales, so the scaler's statistics are far from 0/1) and converted with
``skl2onnx.to_onnx`` at its default opsets, a float32 input ``X`` with a dynamic batch axis, and
(for classifiers) ``zipmap=False``, so probabilities are one tensor. The fixtures:

* ``skl_pca_linreg``: StandardScaler -> PCA(6) -> LinearRegression.
* ``skl_pca_whiten_linreg``: StandardScaler -> PCA(6, whiten) -> LinearRegression.
* ``skl_pca_whiten_ridge``: StandardScaler -> PCA(6, whiten) -> Ridge, two targets.
* ``skl_pca_logreg_binary``: StandardScaler -> PCA(6) -> LogisticRegression, two classes.
* ``skl_pca_whiten_logreg_multi``: StandardScaler -> PCA(6, whiten) -> LogisticRegression,
  three classes (multinomial).
* ``skl_scaler_mlp``: StandardScaler -> MLPClassifier(hidden 16, ReLU), three classes.
* ``skl_columns_ridge``: ColumnTransformer(StandardScaler on 0-3, MinMaxScaler on 4-7,
  RobustScaler on 8-11) -> Ridge.

The saved outputs are scikit-learn's own (``predict``, and ``predict_proba`` for classifiers) on
float32 inputs; scikit-learn computes in float64, ONNX in float32.
"""

from __future__ import annotations

from _common import fixed_hash_seed, save

fixed_hash_seed()

import numpy as np  # noqa: E402
from skl2onnx import to_onnx  # noqa: E402
from sklearn.compose import ColumnTransformer  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler  # noqa: E402

SEED = 22
FEATURES = 12
SAMPLES = 200
BATCH = 16
ATOL = 1e-4
RTOL = 1e-4


def data(rng: np.random.Generator, classes: int | None, targets: int = 1):
    """Features with distinct means and scales; a linear target or classes from a linear score."""
    mean = rng.normal(0, 5, FEATURES)
    scale = rng.uniform(0.2, 10, FEATURES)
    x = (rng.normal(0, 1, (SAMPLES, FEATURES)) * scale + mean).astype(np.float32)
    w = rng.normal(0, 1, (FEATURES, max(targets, classes or 1)))
    score = ((x - mean) / scale) @ w + rng.normal(0, 0.1, (SAMPLES, w.shape[1]))
    if classes is None:
        return x, (score[:, 0] if targets == 1 else score)
    if classes == 2:
        return x, (score[:, 0] > 0).astype(np.int64)
    return x, score.argmax(axis=1).astype(np.int64)


def pipelines():
    columns = ColumnTransformer(
        [
            ("std", StandardScaler(), [0, 1, 2, 3]),
            ("minmax", MinMaxScaler(), [4, 5, 6, 7]),
            ("robust", RobustScaler(), [8, 9, 10, 11]),
        ]
    )
    return {
        "skl_pca_linreg": (make_pipeline(StandardScaler(), PCA(6), LinearRegression()), None, 1),
        "skl_pca_whiten_linreg": (
            make_pipeline(StandardScaler(), PCA(6, whiten=True), LinearRegression()),
            None,
            1,
        ),
        "skl_pca_whiten_ridge": (
            make_pipeline(StandardScaler(), PCA(6, whiten=True), Ridge(alpha=0.5)),
            None,
            2,
        ),
        "skl_pca_logreg_binary": (
            make_pipeline(StandardScaler(), PCA(6), LogisticRegression()),
            2,
            1,
        ),
        "skl_pca_whiten_logreg_multi": (
            make_pipeline(StandardScaler(), PCA(6, whiten=True), LogisticRegression()),
            3,
            1,
        ),
        "skl_scaler_mlp": (
            make_pipeline(
                StandardScaler(),
                MLPClassifier((16,), max_iter=2000, random_state=SEED),
            ),
            3,
            1,
        ),
        "skl_columns_ridge": (make_pipeline(columns, Ridge(alpha=0.5)), None, 1),
    }


def main() -> None:
    rng = np.random.default_rng(SEED)
    for name, (pipeline, classes, targets) in pipelines().items():
        x, y = data(rng, classes, targets)
        pipeline.fit(x, y)
        sample = x[:BATCH] + rng.normal(0, 0.05, (BATCH, FEATURES)).astype(np.float32)
        options = {"zipmap": False} if classes else None
        proto = to_onnx(pipeline, sample[:1], options=options, model_optim=True)
        names = [o.name for o in proto.graph.output]
        if classes:
            label, probabilities = names
            expected = {
                label: pipeline.predict(sample).astype(np.int64),
                probabilities: pipeline.predict_proba(sample).astype(np.float32),
            }
        else:
            (variable,) = names
            predicted = pipeline.predict(sample).astype(np.float32)
            expected = {variable: predicted.reshape(BATCH, -1)}
        save(name, proto, {"X": sample}, expected, atol=ATOL, rtol=RTOL)


if __name__ == "__main__":
    main()
