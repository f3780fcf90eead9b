"""Progress display: a bar on a terminal, a plain line per epoch otherwise."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

__all__ = ["progress_iter", "epoch_line"]


def progress_iter(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if enabled and sys.stderr.isatty():
        return tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True)
    return it


def epoch_line(record: dict) -> str:
    parts = [f"epoch {record['epoch']}"]
    for key, value in record.items():
        if key in ("epoch", "event"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
