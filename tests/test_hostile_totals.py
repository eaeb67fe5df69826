"""The totals of the hostile-input fuzz tests. This file runs after the other
``test_hostile_*.py`` files (pytest takes them in name order) and reads what they counted in
``hostile.COUNTS``."""

import json
import os

import pytest
from hostile import COUNTS, MINIMUM_SHARE


def test_case_counts(capsys):
    """Print how many hostile cases ran, and check each fuzz test ran both kinds."""
    if not COUNTS:
        pytest.skip("no fuzz test ran in this session")
    entries = sorted({entry for entry, _ in COUNTS})
    lines = [f"{entry}: {COUNTS[entry, 'matched']} matched the reference, "
             f"{COUNTS[entry, 'rejected']} rejected" for entry in entries]
    total = sum(COUNTS.values())
    with capsys.disabled():
        print(f"\nhostile-input cases: {total} in all\n  " + "\n  ".join(lines))
    report = os.environ.get("FASTEMB_FUZZ_REPORT")
    if report:
        with open(report, "w") as file:
            json.dump({"total": total, "by_entry": {
                entry: {"matched": COUNTS[entry, "matched"],
                        "rejected": COUNTS[entry, "rejected"]} for entry in entries}}, file,
                indent=1)
    for entry in ("embedding", "embedding_bag", "embedding_bag_backward", "embedding_backward",
                  "module forward", "module backward", "SparseGrad"):
        ran = COUNTS[entry, "matched"] + COUNTS[entry, "rejected"]
        if ran == 0:
            continue  # that test was deselected
        for outcome in ("matched", "rejected"):
            assert COUNTS[entry, outcome] >= MINIMUM_SHARE * ran, (
                f"{entry}: only {COUNTS[entry, outcome]} of {ran} cases {outcome}; the fuzzing "
                "no longer explores both valid and hostile input")
