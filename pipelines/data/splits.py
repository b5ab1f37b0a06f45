"""Cross-dataset near-duplicates (perceptual-hash twins) kept in one split.

Each dataset splits its own rows (its module's split rule, patient-grouped where it has patients); then, for every
pair of datasets, an image of the later one that twins an image of the earlier one (by registry rank: NIH first,
whose splits are fixed by patient) moves into that image's split. Here "kept" is the earlier side of a pair and
"moved" the later one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b)


def _band_masks(max_distance: int) -> list[np.uint64]:
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    return [
        np.uint64(((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]


def find_twins(
    kept_hashes: Sequence[int], moved_hashes: Sequence[int], max_distance: int, budget: int = 1 << 21
) -> list[tuple[int, int, int]]:
    """Pairs (kept index, moved index, distance) whose 64-bit hashes differ in at most ``max_distance`` bits,
    ordered by moved index, then kept index.

    Pigeonhole banding: cut the hash into ``max_distance + 1`` bands; two hashes within the distance agree
    exactly on at least one band, so only bucket-mates are compared. Exact in result. Equal hashes are searched
    once (a set derived from few renders repeats them), bucket-mates are found with sorted bands and
    ``searchsorted``, and at most about ``budget`` of them are held at a time.
    """
    kept = np.asarray(kept_hashes, dtype=np.int64).view(np.uint64)
    moved = np.asarray(moved_hashes, dtype=np.int64).view(np.uint64)
    if not len(kept) or not len(moved):
        return []
    kept_values, kept_of = np.unique(kept, return_inverse=True)
    moved_values, moved_of = np.unique(moved, return_inverse=True)
    kept_members, moved_members = _members(kept_of, len(kept_values)), _members(moved_of, len(moved_values))
    found_kept, found_moved, found_distance = [], [], []
    for k_value, m_value, distance in _close_value_pairs(kept_values, moved_values, max_distance, budget):
        k_index, m_index = np.meshgrid(kept_members[k_value], moved_members[m_value])
        found_kept.append(k_index.ravel())
        found_moved.append(m_index.ravel())
        found_distance.append(np.full(k_index.size, distance))
    if not found_kept:
        return []
    k_index, m_index, distances = (np.concatenate(x) for x in (found_kept, found_moved, found_distance))
    order = np.lexsort((k_index, m_index))
    return list(zip(k_index[order].tolist(), m_index[order].tolist(), distances[order].tolist(), strict=True))


def _members(value_of: np.ndarray, values: int) -> list[np.ndarray]:
    """The indices holding each distinct value, in increasing order."""
    order = np.argsort(value_of, kind="stable")
    return np.split(order, np.searchsorted(value_of[order], np.arange(1, values)))


def _close_value_pairs(
    kept: np.ndarray, moved: np.ndarray, max_distance: int, budget: int
) -> list[tuple[int, int, int]]:
    """(kept value index, moved value index, distance) of distinct hash values within ``max_distance`` bits."""
    bands = []
    for mask in _band_masks(max_distance):
        order = np.argsort(kept & mask, kind="stable")
        sorted_band = (kept & mask)[order]
        lo = np.searchsorted(sorted_band, moved & mask, "left")
        bands.append((order, lo, np.searchsorted(sorted_band, moved & mask, "right") - lo))
    mates = np.cumsum(sum(counts for _, _, counts in bands))  # bucket-mates over all bands, per moved value
    close = []
    start = 0
    while start < len(moved):
        stop = max(start + 1, int(np.searchsorted(mates, (mates[start - 1] if start else 0) + budget, "right")))
        keys = []
        for order, lo, counts in bands:
            part_lo, part_counts = lo[start:stop], counts[start:stop]
            ends = np.cumsum(part_counts)
            if not len(ends) or not ends[-1]:
                continue
            within = np.arange(ends[-1]) - np.repeat(ends - part_counts, part_counts)
            k_index = order[np.repeat(part_lo, part_counts) + within]
            m_index = np.repeat(np.arange(start, stop), part_counts)
            near = _hamming(kept[k_index], moved[m_index]) <= max_distance
            keys.append(m_index[near] * len(kept) + k_index[near])
        if keys:
            m_index, k_index = np.divmod(np.unique(np.concatenate(keys)), len(kept))
            distances = _hamming(kept[k_index], moved[m_index])
            close.extend(zip(k_index.tolist(), m_index.tolist(), distances.tolist(), strict=True))
        start = stop
    return close


def confirm_twins(
    candidates: Sequence[tuple[int, int, int]],
    kept_thumbs: np.ndarray,
    moved_thumbs: np.ndarray,
    min_correlation: float,
    chunk: int = 4096,
) -> list[tuple[int, int, int]]:
    """The candidates whose thumbnails (one image per row) correlate at least ``min_correlation`` (Pearson: 1.0
    for copies up to brightness and contrast; a flat thumbnail correlates 0 with anything). ``chunk`` pairs at a
    time, so memory stays small however many candidates there are."""
    pairs = np.asarray(candidates, dtype=np.int64).reshape(-1, 3)
    kept_rows, moved_rows = kept_thumbs.reshape(len(kept_thumbs), -1), moved_thumbs.reshape(len(moved_thumbs), -1)
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        a, b = _unit_rows(kept_rows[part[:, 0]]), _unit_rows(moved_rows[part[:, 1]])
        keep[start : start + chunk] = np.einsum("ij,ij->i", a, b) >= min_correlation
    return [tuple(row) for row in pairs[keep].tolist()]


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length, so a dot product is their Pearson correlation."""
    rows = rows.astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def place_twins(
    kept_split_of: dict[str, str], moved_split_of: dict[str, str], pairs: Iterable[tuple[str, str]]
) -> list[dict[str, str]]:
    """Move each later-dataset twin into its earlier twin's split (the earlier side stays, e.g. NIH's patient splits).

    A moved image with several kept twins goes to the most held-out of their splits (test over val over train).
    Returns one record per moved image.
    """
    target: dict[str, str] = {}
    for kept_path, moved_path in pairs:
        split = kept_split_of[kept_path]
        if moved_path not in target or _SPLIT_RANK[split] > _SPLIT_RANK[target[moved_path]]:
            target[moved_path] = split
    records = []
    for moved_path, split in sorted(target.items()):
        if moved_split_of[moved_path] != split:
            records.append({"relpath": moved_path, "from": moved_split_of[moved_path], "to": split})
            moved_split_of[moved_path] = split
    return records
