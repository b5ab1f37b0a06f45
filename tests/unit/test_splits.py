"""Split assignment: patient-grouped NIH, stratified COVID (the dataset modules' rules), twins found exactly and
kept together."""

from __future__ import annotations

import numpy as np

from pipelines.data.datasets.covid import covid_splits
from pipelines.data.datasets.nih import nih_splits
from pipelines.data.splits import confirm_twins, find_twins, place_twins


def _nih_rows(patients: int = 200, per_patient: int = 3):
    return [
        {"relpath": f"p{p}_{k}.png", "patient_id": f"p{p}", "official_split": "test" if p % 5 == 0 else "train_val"}
        for p in range(patients)
        for k in range(per_patient)
    ]


def test_nih_splits_are_patient_disjoint_and_respect_official_test():
    rows = _nih_rows()
    split_of = nih_splits(rows, val_fraction=0.2, seed=1)
    patients = {}
    for row in rows:
        patients.setdefault(row["patient_id"], set()).add(split_of[row["relpath"]])
        if row["official_split"] == "test":
            assert split_of[row["relpath"]] == "test"
        else:
            assert split_of[row["relpath"]] in ("train", "val")
    assert all(len(s) == 1 for s in patients.values())
    val_patients = sum(1 for s in patients.values() if s == {"val"})
    assert val_patients == round(0.2 * 160)
    assert nih_splits(rows, 0.2, seed=1) == split_of
    assert nih_splits(rows, 0.2, seed=2) != split_of


def test_covid_splits_are_stratified():
    rows = [{"relpath": f"c{c}/{i}.png", "labels": [c]} for c in range(4) for i in range(100 * (c + 1))]
    split_of = covid_splits(rows, val_fraction=0.1, test_fraction=0.2, seed=0)
    for c in range(4):
        mine = [split_of[r["relpath"]] for r in rows if r["labels"][0] == c]
        assert mine.count("test") == round(0.2 * len(mine))
        assert mine.count("val") == round(0.1 * len(mine))


def test_find_twins_matches_brute_force():
    rng = np.random.default_rng(0)
    nih = rng.integers(-(2**63), 2**63 - 1, size=500, dtype=np.int64)
    flips = [np.int64(1) << np.int64(b) for b in (0, 17, 40, 63)]
    far = flips[0] ^ flips[1] ^ flips[2] ^ np.int64(0b1110)  # 6 bits away: not a twin
    covid = [int(nih[3] ^ flips[0] ^ flips[1]), int(nih[10]), int(nih[99] ^ flips[3]), int(nih[7] ^ far)]
    covid += rng.integers(-(2**63), 2**63 - 1, size=50, dtype=np.int64).tolist()
    found = find_twins(nih.tolist(), covid, max_distance=4)
    brute = [
        (i, j, d)
        for j, c in enumerate(covid)
        for i, n in enumerate(nih.tolist())
        if (d := bin((n ^ c) & (2**64 - 1)).count("1")) <= 4
    ]
    assert sorted(found) == sorted(brute)
    assert {(i, j) for i, j, _ in found} >= {(3, 0), (10, 1), (99, 2)}


def test_find_twins_is_exact_when_many_hashes_collide():
    # Few base hashes, each copied with 0-6 random bit flips: most pairs share a band (the scale set's case),
    # and a chunk smaller than the covid list exercises the chunked search.
    rng = np.random.default_rng(1)
    bases = rng.integers(-(2**63), 2**63 - 1, size=6, dtype=np.int64)

    def near(count):
        values = []
        for base in rng.choice(bases, size=count):
            bits = rng.choice(64, size=rng.integers(0, 7), replace=False)
            values.append(
                int(base ^ np.bitwise_or.reduce(np.left_shift(np.int64(1), bits.astype(np.int64)), initial=np.int64(0)))
            )
        return values

    nih, covid = near(300), near(70)
    found = find_twins(nih, covid, max_distance=4, budget=64)
    brute = [
        (i, j, d)
        for j, c in enumerate(covid)
        for i, n in enumerate(nih)
        if (d := bin((n ^ c) & (2**64 - 1)).count("1")) <= 4
    ]
    assert found == brute  # same pairs, ordered by covid index then nih index
    assert len(brute) > 500


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def test_confirm_twins_keeps_pairs_that_correlate_like_the_pairwise_check():
    rng = np.random.default_rng(2)
    nih = rng.integers(0, 256, size=(40, 32, 32), dtype=np.uint8)
    covid = rng.integers(0, 256, size=(30, 32, 32), dtype=np.uint8)
    covid[0] = np.clip(nih[5].astype(int) // 2 + 40, 0, 255)  # the same picture, darker and flatter
    covid[1] = nih[6]
    covid[1, :4] = 0  # a copy with a band blacked out: correlated, but under 0.995
    covid[2] = 128  # flat: correlates 0 with anything
    candidates = [(i, j, 0) for i in range(40) for j in range(30)]
    kept = confirm_twins(candidates, nih, covid, min_correlation=0.995, chunk=64)
    expected = [(i, j, d) for i, j, d in candidates if _pearson(nih[i], covid[j]) >= 0.995]
    assert kept == expected == [(5, 0, 0)]
    assert confirm_twins([], nih, covid, 0.995) == []


def test_place_twins_moves_covid_into_nih_split():
    nih = {"a.png": "test", "b.png": "train", "c.png": "val"}
    covid = {"x.png": "train", "y.png": "test", "z.png": "train"}
    moved = place_twins(nih, covid, [("a.png", "x.png"), ("b.png", "y.png"), ("c.png", "z.png"), ("a.png", "z.png")])
    assert covid == {"x.png": "test", "y.png": "train", "z.png": "test"}
    assert len(moved) == 3
