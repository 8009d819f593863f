"""Leak-free, class-stratified, seeded splits and samples.

Every step that looks at data gets its own part of it: training,
calibration, score selection, baseline fitting and evaluation each take a
*disjoint* index set from :func:`stratified_split`, and an evaluation that
wants "N correctly classified images" draws them with
:func:`stratified_sample` rather than taking the first N (an image folder
is read class by class, so its first N images are one class).

Rules, the same for every caller:

* ``sizes`` are counts (``int``) or fractions of all the items (``float``
  in (0, 1]); the items no split asked for go to the remainder split
  (``rest``, named by the caller).
* Each split is stratified: class ``c`` gets ``n_split * n_c / n`` of the
  split, rounded by largest remainder, so every class count is within one
  item of its exact share (unless the class has run out).
* Splits are drawn in the order given from one seeded permutation of each
  class, so the same labels, sizes and seed give the same indices, and a
  different seed gives different ones.  Index sets come back sorted.
* A split that cannot be satisfied raises :class:`SplitError` naming the
  split, the size asked and the count available; with ``shrink=True`` the
  requests are scaled down proportionally and the result carries a note
  saying so.  A split that would be empty raises in either case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

REST = "rest"


class SplitError(ValueError):
    """A split or sample asks for more items than there are."""


class SplitResult(dict):
    """``{split name: sorted LongTensor of indices}``, plus ``notes``: what
    was shrunk, and classes a split holds no item of."""

    def __init__(self, *args, notes: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[str] = list(notes)


def _as_labels(labels) -> np.ndarray:
    array = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _class_pools(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Each class's indices in a seeded random order (classes in sorted order,
    so the stream of random numbers does not depend on dict ordering)."""
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def _requested(sizes: Mapping[str, int | float], total: int, rest: str) -> dict[str, int]:
    """The item count each split asks for (fractions are of ``total``)."""
    counts = {}
    for name, size in sizes.items():
        if name == rest:
            raise ValueError(f"split name {rest!r} is reserved for the remainder")
        if isinstance(size, bool) or not isinstance(size, (int, float, np.integer, np.floating)):
            raise ValueError(f"split {name!r}: size must be a count (int) or a fraction (float), got {size!r}")
        if isinstance(size, (float, np.floating)):
            if not 0.0 < size <= 1.0:
                raise ValueError(f"split {name!r}: fraction must be in (0, 1], got {size}")
            counts[name] = int(round(total * float(size)))
            if counts[name] == 0:
                raise SplitError(f"split {name!r}: {size:g} of {total} items is 0 items; "
                                 f"there is too little data for this split")
        else:
            if size < 0:
                raise ValueError(f"split {name!r}: count must be >= 0, got {size}")
            counts[name] = int(size)
    return counts


def _check_or_shrink(counts: dict[str, int], total: int, shrink: bool) -> tuple[dict[str, int], list[str]]:
    asked = sum(counts.values())
    if asked <= total:
        return counts, []
    if not shrink:
        used = 0
        for name, count in counts.items():
            if used + count > total:
                before = f" after the {used} taken by the splits before it" if used else ""
                raise SplitError(
                    f"split {name!r} asks for {count} items but only {total - used} are available{before} "
                    f"({total} in all, {asked} asked by {len(counts)} splits); ask for fewer or pass shrink=True"
                )
            used += count
    shrunk = _largest_remainder({k: v * total / asked for k, v in counts.items()}, total, None)
    for name, count in shrunk.items():
        if count == 0 and counts[name] > 0:
            raise SplitError(f"split {name!r}: shrinking {asked} requested items to the {total} available "
                             f"leaves it empty (it asked for {counts[name]})")
    detail = ", ".join(f"{k} {counts[k]}->{shrunk[k]}" for k in counts)
    return shrunk, [f"shrank the splits proportionally to fit {total} items (asked {asked}): {detail}"]


def _largest_remainder(quotas: Mapping, total: int, capacity: Mapping | None) -> dict:
    """Integer counts summing to ``total`` (<= sum of capacities): floors of
    the quotas, then one more each to the largest remainders; ties and
    capacity overflow go to the next key in order."""
    cap = capacity or {k: math.inf for k in quotas}
    counts = {k: min(int(math.floor(q)), cap[k]) for k, q in quotas.items()}
    order = sorted(quotas, key=lambda k: -(quotas[k] - math.floor(quotas[k])))
    left = total - sum(counts.values())
    while left > 0:
        progressed = False
        for key in order:
            if left and counts[key] < cap[key]:
                counts[key] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise SplitError(f"cannot place {left} more items: every class is exhausted")
    return counts


def stratified_split(
    labels,
    sizes: Mapping[str, int | float],
    seed: int,
    *,
    shrink: bool = False,
    rest: str = REST,
) -> SplitResult:
    """Disjoint, class-stratified, seeded index sets, one per entry of
    ``sizes`` (in order), plus ``rest`` holding every item not asked for.

    ``sizes``: ``{"calibration": 0.1, "selection": 500, ...}``: a float is a
    fraction of all items, an int a count.  Raises :class:`SplitError` (naming
    the split, the size asked and the count available) when the data is too
    small, unless ``shrink=True``: then every request is scaled down by the
    same factor and ``result.notes`` says so.
    """
    array = _as_labels(labels)
    total = len(array)
    counts, notes = _check_or_shrink(_requested(sizes, total, rest), total, shrink)
    pools = _class_pools(array, np.random.default_rng(seed))
    taken = {c: 0 for c in pools}
    result = SplitResult()
    for name, count in counts.items():
        remaining = {c: len(pool) - taken[c] for c, pool in pools.items()}
        quotas = {c: count * len(pool) / total for c, pool in pools.items()}
        per_class = _largest_remainder(quotas, count, remaining)
        parts = [pools[c][taken[c]:taken[c] + k] for c, k in per_class.items()]
        for c, k in per_class.items():
            taken[c] += k
        result[name] = _sorted_tensor(parts)
        missing = [c for c, k in per_class.items() if k == 0]
        if count and missing:
            notes.append(f"split {name!r} ({count} items) holds no item of class(es) {missing}")
    result[rest] = _sorted_tensor([pool[taken[c]:] for c, pool in pools.items()])
    result.notes.extend(notes)
    return result


def _sorted_tensor(parts: list[np.ndarray]) -> torch.Tensor:
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.sort(joined).astype(np.int64))


def stratified_sample(
    labels,
    n: int,
    seed: int,
    mask=None,
    *,
    shrink: bool = False,
    notes: list[str] | None = None,
    what: str = "items",
) -> torch.Tensor:
    """``n`` indices among those where ``mask`` is True (all when None),
    drawn round-robin over the classes in a seeded random order, each class's
    items in a seeded random order; so the classes are as balanced as the
    candidates allow, and every prefix of the result is balanced too.

    Fewer than ``n`` candidates: :class:`SplitError` naming ``what``, the
    count asked and the count available; with ``shrink=True`` all candidates
    are returned and a note is appended to ``notes`` (when given).
    """
    array = _as_labels(labels)
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a count >= 0, got {n!r}")
    keep = np.ones(len(array), dtype=bool) if mask is None else _as_mask(mask, len(array))
    available = int(keep.sum())
    if n > available:
        where = f" of {len(array)} ({what} where the mask holds)" if mask is not None else ""
        message = f"asked for {n} {what} but only {available} are available{where}"
        if not shrink:
            raise SplitError(message + "; ask for fewer or pass shrink=True")
        if notes is not None:
            notes.append(message + f"; using all {available}")
        n = available
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(keep)
    pools = _class_pools(array[candidates], rng)
    classes = rng.permutation(np.array(sorted(pools), dtype=np.int64))
    depth = max((len(p) for p in pools.values()), default=0)
    order = [candidates[pools[int(c)][i]] for i in range(depth) for c in classes if i < len(pools[int(c)])]
    return torch.tensor(order[:n], dtype=torch.long)


def _as_mask(mask, length: int) -> np.ndarray:
    array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.shape != (length,) or array.dtype != np.bool_:
        raise ValueError(f"mask must be a boolean vector of length {length}, got {array.dtype} {array.shape}")
    return array


def class_counts(labels, index=None) -> dict[int, int]:
    """``{class: count}`` of ``labels`` (restricted to ``index``): for
    reporting how a split or sample came out."""
    array = _as_labels(labels)
    if index is not None:
        array = array[np.asarray(index, dtype=np.int64)]
    values, counts = np.unique(array, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}
