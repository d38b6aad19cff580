"""Memory sizes as people write them ("1GiB", "512M", "1e9") and as minilars prints them.

The one size parser of the project: `minilars finetune --max-memory`, `minilars plan
--max-memory`, `minilars bench memory --max-rss` and the planner's budgets all read
sizes through `parse_size`.
"""
from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """'1GiB' -> 1073741824. Binary units with or without 'i' (1G = 1GB = 1GiB:
    memory is sold in powers of two); a bare number is bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text}")
        return int(text)
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"cannot read size {text!r}; write e.g. 1GiB, 512MiB, 2G or a number of bytes")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def format_size(n: int | float) -> str:
    """Bytes as MiB (or GiB from 10 GiB up), the unit the bench tables use."""
    if abs(n) >= 10 * 2**30:
        return f"{n / 2**30:,.2f} GiB"
    return f"{n / 2**20:,.1f} MiB"


__all__ = ["format_size", "parse_size"]
