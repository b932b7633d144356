"""Turn results into standard JSON: NaN/inf become ``null``, numpy scalars Python numbers.

>>> import pandas as pd
>>> jsonable({"a": float("nan"), "b": (1.5, float("inf"))})
{'a': None, 'b': [1.5, None]}
>>> records(pd.DataFrame({"x": [1.0, float("nan")]}))
[{'x': 1.0}, {'x': None}]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["jsonable", "records"]


def jsonable(x: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, recursively (the JSON stays standard)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return jsonable(frame.astype(object).where(frame.notna(), None).to_dict(orient="records"))
