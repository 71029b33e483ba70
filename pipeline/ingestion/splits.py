"""Patient-level train / val / test assignment, stratified by each patient's label."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable


def patient_labels(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Each patient's majority label (ties -> the lowest class index) from (patient, label) rows."""
    counts: dict[str, Counter[int]] = defaultdict(Counter)
    for patient, label in rows:
        counts[patient][label] += 1
    return {p: min(c, key=lambda label: (-c[label], label)) for p, c in counts.items()}


def assign_splits(
    labels: dict[str, int], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Map every patient to ``train``, ``val`` or ``test``.

    Within each label the patients are sorted, shuffled with ``seed`` and cut by the
    fractions (rounded), so the result depends only on the patient set and the seed.
    When a site has at least three patients, each split with a fraction above 0 gets at least
    one patient: an empty one takes a patient from the largest train class (while train has
    one to give). ``test_fraction=1`` puts the whole site in ``test`` (an external site);
    ``val_fraction=0`` leaves ``val`` empty.
    """
    if not 0 <= val_fraction <= 1 or not 0 <= test_fraction <= 1 or val_fraction + test_fraction > 1:
        raise ValueError(
            f"split fractions val={val_fraction}, test={test_fraction}: need each in [0, 1] "
            "and a sum of at most 1 (preprocess.split.val_fraction / test_fraction)"
        )
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = defaultdict(list)
    for patient, label in sorted(labels.items()):
        by_label[label].append(patient)
    split_of: dict[str, str] = {}
    train_by_label: dict[int, list[str]] = {}
    for label in sorted(by_label):
        patients = by_label[label]
        rng.shuffle(patients)
        n_test = round(len(patients) * test_fraction)
        n_val = round(len(patients) * val_fraction)
        split_of.update({p: "test" for p in patients[:n_test]})
        split_of.update({p: "val" for p in patients[n_test : n_test + n_val]})
        train_by_label[label] = patients[n_test + n_val :]
        split_of.update({p: "train" for p in train_by_label[label]})
    if len(labels) >= 3:
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            if fraction > 0 and split not in split_of.values():
                donor = max(train_by_label, key=lambda label: (len(train_by_label[label]), -label))
                if train_by_label[donor]:
                    split_of[train_by_label[donor].pop()] = split
    return split_of
