"""Linear probes with a control task (Hewitt & Liang, 2019) and the "breakthrough" layer of the spelling study
(docs/methods.md, spelling-out).

A probe is a multinomial logistic regression (scikit-learn) on standardised features, trained on a random
share of the rows and scored on the rest; the rows are distinct tokens, so the split is token-disjoint. The
control task gives every token type a random label drawn from the same labels (a permutation of them): a probe
can only reach it by memorising tokens, which a token-disjoint test never rewards, so its test accuracy shows
what the probe reaches from the class balance alone. Selectivity = accuracy − control accuracy.

Classes with fewer than ``min_per_class`` rows are left out (their rows counted in ``dropped``); fewer than two
classes left raises :class:`~knlens.core.errors.InsufficientDataError` saying how many rows are needed.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = rng.choice(list("abcd"), 200)
>>> x = np.eye(4)[np.searchsorted(list("abcd"), y)] * 3 + rng.normal(size=(200, 4))
>>> r = probe(x, y)
>>> r["accuracy"] > 0.9, r["control"] < 0.5
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from knlens.core.errors import InsufficientDataError, SettingsError

__all__ = ["MIN_PER_CLASS", "probe", "probe_table", "breakthrough"]

MIN_PER_CLASS = 4  # rows a class needs: >= 2 in training and >= 1 in the test share after a stratified split


def _fit_score(x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, c: float, seed: int) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=300, random_state=seed))
    model.fit(x[train], y[train])
    return float((model.predict(x[test]) == y[test]).mean())


def probe(x: Float[np.ndarray, "n d"], y: Sequence[str] | np.ndarray, *, test_share: float = 0.25, seed: int = 0,
          min_per_class: int = MIN_PER_CLASS, c: float = 0.1) -> dict[str, Any]:
    """Train and test one probe and its control task (see the module): ``accuracy``, ``control``,
    ``selectivity``, ``majority`` (the test share of the most frequent training class), ``n_train``, ``n_test``,
    ``classes`` and ``dropped`` (rows of classes with fewer than ``min_per_class`` rows)."""
    if min_per_class < 4:
        raise SettingsError(f"min_per_class must be at least 4 (2 to train, 1 to test, stratified), got {min_per_class}")
    if not 0 < test_share < 1:
        raise SettingsError(f"test_share must be in (0, 1), got {test_share}")
    y = np.asarray(y)
    if len(y) != len(x):
        raise SettingsError(f"{len(x)} feature rows but {len(y)} labels")
    labels, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, labels[counts >= min_per_class])
    n_classes = int((counts >= min_per_class).sum())
    if n_classes < 2:
        raise InsufficientDataError(f"a probe needs at least {min_per_class} examples in each of at least 2 classes; "
                                    f"got {len(y)} rows in {len(labels)} classes, {n_classes} with enough rows")
    x, y = np.asarray(x, dtype=np.float32)[keep], y[keep]
    idx = np.arange(len(y))
    n_test = max(int(round(test_share * len(y))), n_classes)
    if len(y) - n_test < 2 * n_classes:
        raise InsufficientDataError(f"{len(y)} rows in {n_classes} classes are too few to split {test_share:.0%} off "
                                    f"for testing; a probe needs at least {min_per_class} rows per class")
    train, test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
    control = np.random.default_rng(seed).permutation(y)  # one random label per token type, same label counts
    acc = _fit_score(x, y, train, test, c, seed)
    ctrl = _fit_score(x, control, train, test, c, seed)
    values, n = np.unique(y[train], return_counts=True)
    majority = float((y[test] == values[n.argmax()]).mean())
    return {"accuracy": acc, "control": ctrl, "selectivity": acc - ctrl, "majority": majority,
            "n_train": len(train), "n_test": len(test), "classes": n_classes, "dropped": int((~keep).sum())}


def probe_table(features: Float[np.ndarray, "n feature d"], words: Sequence[str], ks: Sequence[int],
                names: Sequence[str], **kw: Any) -> pd.DataFrame:
    """:func:`probe` of character ``k`` of each word from each feature (``features[:, i]`` named ``names[i]``):
    one row per (feature, k) with the column ``feature_index`` (0 = the first feature) and ``k`` (0-based).

    >>> import numpy as np
    >>> words = [a + b + "xyz" for a in "abcd" for b in "efgh"] * 1
    >>> f = np.random.default_rng(0).normal(size=(len(words), 2, 8))
    >>> probe_table(f, words, [0], ["embedding", "layer 0"], min_per_class=4, test_share=0.25).shape
    (2, 11)
    """
    if len(set(words)) != len(words):
        raise SettingsError("probe_table needs distinct words: the train/test split must be token-disjoint")
    if features.shape[1] != len(names):
        raise SettingsError(f"{features.shape[1]} features but {len(names)} names")
    rows = []
    for i, name in enumerate(names):
        for k in ks:
            y = [w[k] for w in words]
            rows.append({"feature": name, "feature_index": i, "k": int(k), **probe(features[:, i], y, **kw)})
    return pd.DataFrame(rows)


def breakthrough(table: pd.DataFrame) -> dict[str, Any]:
    """The "breakthrough" of the probes for characters beyond the first (``k >= 1``): their mean accuracy per
    feature; the first feature whose mean reaches halfway from the embedding's to the best feature's
    (``layer``, the rule), and the feature after the largest rise from the one before (``largest_jump``).
    ``clear`` says whether the rise (best − embedding) exceeds ``noise``, two binomial standard errors of the best
    feature's mean accuracy (from the test sizes, when the table has ``n_test``; else any rise counts); without it
    there is no breakthrough to speak of.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"feature": ["embedding", "layer 0", "layer 1", "layer 2"] * 2, "feature_index": [0, 1, 2, 3] * 2,
    ...                   "k": [1] * 4 + [2] * 4, "accuracy": [0.1, 0.1, 0.5, 0.6] * 2})
    >>> b = breakthrough(t)
    >>> b["layer"], b["largest_jump"], round(b["embedding"], 2), round(b["best"], 2)
    ('layer 1', 'layer 1', 0.1, 0.6)
    """
    later = table[table["k"] >= 1]
    if later.empty:
        raise InsufficientDataError("no probe of a character beyond the first: the breakthrough needs k >= 1")
    mean = later.groupby(["feature_index", "feature"], as_index=False)["accuracy"].mean().sort_values("feature_index")
    acc, names = mean["accuracy"].to_numpy(), mean["feature"].tolist()
    half = acc[0] + (acc.max() - acc[0]) / 2
    first = int(np.argmax(acc >= half)) if acc.max() > acc[0] else 0
    jump = int(np.argmax(np.diff(acc))) + 1 if len(acc) > 1 else 0
    best = mean.iloc[int(acc.argmax())]
    n_test = later[later.feature_index == best.feature_index]["n_test"] if "n_test" in later else pd.Series(dtype=float)
    noise = float(2 * np.sqrt((acc.max() * (1 - acc.max()) / n_test).sum()) / len(n_test)) if len(n_test) else np.nan
    return {"layer": names[first], "rise": float(acc.max() - acc[0]), "noise": noise,
            "clear": bool(acc.max() - acc[0] > (noise if np.isfinite(noise) else 0.0)), "largest_jump": names[jump],
            "jump": float(acc[jump] - acc[jump - 1]) if jump else 0.0,
            "embedding": float(acc[0]), "best": float(acc.max()), "best_feature": names[int(acc.argmax())],
            "rule": "first feature whose mean accuracy over characters k >= 2 (1-based) reaches halfway from the "
                    "embedding's to the best feature's"}
