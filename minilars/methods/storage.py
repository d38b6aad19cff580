"""Activation-storage recipes: what LARS keeps of each block for backward.

A recipe is a tuple of (field pattern, policy) rules that store.StoragePlan reads
(minilars/store.py lists the fields and policies). docs/lars.md says why the default
is what it is; docs/speed.md measures the fast one.
"""
from __future__ import annotations

from ..store import parse_policy

# The default LARS recipe (docs/lars.md says why): subspace adapters of rank 16 on
# every projection; blocks recomputed in backward from their input, kept in float16.
LARS_DEFAULT_STORAGE = (("block", "recompute"), ("input.x", "half"))
# The same, keeping each block's attention output (float16) and log-sum-exp as well, so
# backward does not rerun the attention kernel: 2 H hd + 4 H more bytes per token per
# block, one T^2 attention forward per block less (docs/speed.md measures both).
LARS_FAST_STORAGE = (*LARS_DEFAULT_STORAGE, ("attn.o", "half"))
# The default recipe with the block inputs written to a file instead of RAM (store.Offload,
# minilars/offload.py): the same float16 values, so the same gradients, bit for bit. The
# directory is the system temp dir; 'block=recompute,input.x=offload(DIR)' names another.
LARS_OFFLOAD_STORAGE = (("block", "recompute"), ("input.x", "offload"))
NAMED_STORAGE = {"default": LARS_DEFAULT_STORAGE, "fast": LARS_FAST_STORAGE, "offload": LARS_OFFLOAD_STORAGE,
                 "exact": ()}


def parse_storage(text: str | None) -> tuple[tuple[str, str], ...]:
    """'block=recompute,input.x=half' -> (('block', 'recompute'), ('input.x', 'half'));
    a name of NAMED_STORAGE: 'default' (the default LARS recipe), 'fast' (the same
    keeping attention outputs too), 'offload' (the default with the block inputs
    written to a file in the system temp dir, not kept in RAM), 'exact' (everything exact)."""
    if text is None:
        return LARS_DEFAULT_STORAGE
    if text.strip() in NAMED_STORAGE:
        return NAMED_STORAGE[text.strip()]
    rules = []
    for part in _split_top_level(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"storage rule {part!r} must look like FIELD=POLICY, e.g. mlp.*=subspace(32)")
        parse_policy(value.strip())
        rules.append((key.strip(), value.strip()))
    return tuple(rules)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in (parts + [current]) if p.strip()]
