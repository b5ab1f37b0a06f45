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


def _hamming(a: np.ndarray, b: int) -> np.ndarray:
    return np.unpackbits((a ^ np.int64(b)).view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)


def find_twins(nih_hashes: Sequence[int], covid_hashes: Sequence[int], max_distance: int) -> list[tuple[int, int, int]]:
    """Pairs (nih index, covid index, distance) whose 64-bit hashes differ in at most ``max_distance`` bits.

    Pigeonhole banding: cut the hash into ``max_distance + 1`` bands; two hashes within the distance agree
    exactly on at least one band, so only bucket-mates are compared. Linear in practice, exact in result.
    """
    if not len(nih_hashes) or not len(covid_hashes):
        return []
    nih = np.asarray(nih_hashes, dtype=np.int64)
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    masks = [((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    unsigned = nih.view(np.uint64)
    buckets: list[dict[int, list[int]]] = []
    for mask in masks:
        bucket: dict[int, list[int]] = defaultdict(list)
        for index, value in enumerate((unsigned & np.uint64(mask)).tolist()):
            bucket[value].append(index)
        buckets.append(bucket)
    twins = []
    for c_index, c_hash in enumerate(np.asarray(covid_hashes, dtype=np.int64).view(np.uint64).tolist()):
        candidates = {i for mask, bucket in zip(masks, buckets, strict=True) for i in bucket.get(c_hash & mask, ())}
        if not candidates:
            continue
        ids = np.fromiter(sorted(candidates), dtype=np.int64)
        distances = _hamming(nih[ids], _signed(c_hash))
        twins.extend((int(i), c_index, int(d)) for i, d in zip(ids, distances, strict=True) if d <= max_distance)
    return twins


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= (1 << 63) else value


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
