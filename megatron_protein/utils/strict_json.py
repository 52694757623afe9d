"""Strict JSON for reports and logs: JSON has no NaN or infinity, so they are written as ``null`` (a metric with no
sample, a chain without a non-local pair) and the files parse in any JSON reader, not only Python's."""
from __future__ import annotations

import math

import numpy as np


def finite(value):
    """``value`` with every non-finite float (Python or numpy, in nested dicts, lists and tuples) replaced by
    ``None``; numpy floats become Python floats."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
