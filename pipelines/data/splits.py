"""Leak-free train/val/test assignment: patient-grouped NIH splits, stratified COVID splits, and
cross-dataset near-duplicates (perceptual-hash twins) kept in one split.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_RANK = {"train": 0, "val": 1, "test": 2}


def nih_splits(rows: Iterable[dict[str, Any]], val_fraction: float, seed: int) -> dict[str, str]:
    """Official ``test_list.txt`` is test; a seeded, patient-grouped fraction of train_val is val.

    Grouping is by patient so that no patient's follow-up images land on both sides of a split.
    """
    rows = list(rows)
    train_val_patients = sorted({r["patient_id"] for r in rows if r["official_split"] == "train_val"})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_val_patients))
    n_val = round(val_fraction * len(train_val_patients))
    val_patients = {train_val_patients[i] for i in order[:n_val]}
    split_of = {}
    for row in rows:
        if row["official_split"] == "test":
            split_of[row["relpath"]] = "test"
        else:
            split_of[row["relpath"]] = "val" if row["patient_id"] in val_patients else "train"
    return split_of


def covid_splits(
    rows: Iterable[dict[str, Any]], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Class-stratified random split (the database has no patient ids, so each image is its own group)."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for row in rows:
        by_class[row["covid_label"]].append(row["relpath"])
    split_of = {}
    for label in sorted(by_class):
        paths = sorted(by_class[label])
        order = np.random.default_rng([seed, label]).permutation(len(paths))
        n_test, n_val = round(test_fraction * len(paths)), round(val_fraction * len(paths))
        for rank, index in enumerate(order):
            split_of[paths[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split_of


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a ^ b)


def _band_masks(max_distance: int) -> list[np.uint64]:
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    return [
        np.uint64(((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]


def find_twins(
    nih_hashes: Sequence[int], covid_hashes: Sequence[int], max_distance: int, budget: int = 1 << 21
) -> list[tuple[int, int, int]]:
    """Pairs (nih index, covid index, distance) whose 64-bit hashes differ in at most ``max_distance`` bits,
    ordered by covid index, then nih index.

    Pigeonhole banding: cut the hash into ``max_distance + 1`` bands; two hashes within the distance agree
    exactly on at least one band, so only bucket-mates are compared. Exact in result. Equal hashes are searched
    once (a set derived from few renders repeats them), bucket-mates are found with sorted bands and
    ``searchsorted``, and at most about ``budget`` of them are held at a time.
    """
    nih = np.asarray(nih_hashes, dtype=np.int64).view(np.uint64)
    covid = np.asarray(covid_hashes, dtype=np.int64).view(np.uint64)
    if not len(nih) or not len(covid):
        return []
    nih_values, nih_of = np.unique(nih, return_inverse=True)
    covid_values, covid_of = np.unique(covid, return_inverse=True)
    nih_members, covid_members = _members(nih_of, len(nih_values)), _members(covid_of, len(covid_values))
    found_nih, found_covid, found_distance = [], [], []
    for n_value, c_value, distance in _close_value_pairs(nih_values, covid_values, max_distance, budget):
        n_index, c_index = np.meshgrid(nih_members[n_value], covid_members[c_value])
        found_nih.append(n_index.ravel())
        found_covid.append(c_index.ravel())
        found_distance.append(np.full(n_index.size, distance))
    if not found_nih:
        return []
    n_index, c_index, distances = (np.concatenate(x) for x in (found_nih, found_covid, found_distance))
    order = np.lexsort((n_index, c_index))
    return list(zip(n_index[order].tolist(), c_index[order].tolist(), distances[order].tolist(), strict=True))


def _members(value_of: np.ndarray, values: int) -> list[np.ndarray]:
    """The indices holding each distinct value, in increasing order."""
    order = np.argsort(value_of, kind="stable")
    return np.split(order, np.searchsorted(value_of[order], np.arange(1, values)))


def _close_value_pairs(
    nih: np.ndarray, covid: np.ndarray, max_distance: int, budget: int
) -> list[tuple[int, int, int]]:
    """(nih value index, covid value index, distance) of distinct hash values within ``max_distance`` bits."""
    bands = []
    for mask in _band_masks(max_distance):
        order = np.argsort(nih & mask, kind="stable")
        sorted_band = (nih & mask)[order]
        lo = np.searchsorted(sorted_band, covid & mask, "left")
        bands.append((order, lo, np.searchsorted(sorted_band, covid & mask, "right") - lo))
    mates = np.cumsum(sum(counts for _, _, counts in bands))  # bucket-mates over all bands, per covid value
    close = []
    start = 0
    while start < len(covid):
        stop = max(start + 1, int(np.searchsorted(mates, (mates[start - 1] if start else 0) + budget, "right")))
        keys = []
        for order, lo, counts in bands:
            part_lo, part_counts = lo[start:stop], counts[start:stop]
            ends = np.cumsum(part_counts)
            if not len(ends) or not ends[-1]:
                continue
            within = np.arange(ends[-1]) - np.repeat(ends - part_counts, part_counts)
            n_index = order[np.repeat(part_lo, part_counts) + within]
            c_index = np.repeat(np.arange(start, stop), part_counts)
            near = _hamming(nih[n_index], covid[c_index]) <= max_distance
            keys.append(c_index[near] * len(nih) + n_index[near])
        if keys:
            c_index, n_index = np.divmod(np.unique(np.concatenate(keys)), len(nih))
            distances = _hamming(nih[n_index], covid[c_index])
            close.extend(zip(n_index.tolist(), c_index.tolist(), distances.tolist(), strict=True))
        start = stop
    return close


def confirm_twins(
    candidates: Sequence[tuple[int, int, int]],
    nih_thumbs: np.ndarray,
    covid_thumbs: np.ndarray,
    min_correlation: float,
    chunk: int = 4096,
) -> list[tuple[int, int, int]]:
    """The candidates whose thumbnails (one image per row) correlate at least ``min_correlation`` (Pearson: 1.0
    for copies up to brightness and contrast; a flat thumbnail correlates 0 with anything). ``chunk`` pairs at a
    time, so memory stays small however many candidates there are."""
    pairs = np.asarray(candidates, dtype=np.int64).reshape(-1, 3)
    nih_rows, covid_rows = nih_thumbs.reshape(len(nih_thumbs), -1), covid_thumbs.reshape(len(covid_thumbs), -1)
    keep = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        a, b = _unit_rows(nih_rows[part[:, 0]]), _unit_rows(covid_rows[part[:, 1]])
        keep[start : start + chunk] = np.einsum("ij,ij->i", a, b) >= min_correlation
    return [tuple(row) for row in pairs[keep].tolist()]


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit length, so a dot product is their Pearson correlation."""
    rows = rows.astype(np.float64)
    rows -= rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)


def place_twins(
    nih_split_of: dict[str, str], covid_split_of: dict[str, str], pairs: Iterable[tuple[str, str]]
) -> list[dict[str, str]]:
    """Move each COVID twin into its NIH twin's split (NIH splits are fixed by patient and must not move).

    A COVID image with several NIH twins goes to the most held-out of their splits (test over val over train).
    Returns one record per moved image.
    """
    target: dict[str, str] = {}
    for nih_path, covid_path in pairs:
        split = nih_split_of[nih_path]
        if covid_path not in target or _SPLIT_RANK[split] > _SPLIT_RANK[target[covid_path]]:
            target[covid_path] = split
    moved = []
    for covid_path, split in sorted(target.items()):
        if covid_split_of[covid_path] != split:
            moved.append({"relpath": covid_path, "from": covid_split_of[covid_path], "to": split})
            covid_split_of[covid_path] = split
    return moved
