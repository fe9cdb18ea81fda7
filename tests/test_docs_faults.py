"""docs/faults.md, the table of faults and bad inputs, names the test behind each row: each must exist, so
a row cannot outlive the test that keeps it true; and the tests of the bad-input file are all in the table."""
import re

from conftest import REPO

TABLE = REPO / "docs" / "faults.md"
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def test_every_row_of_the_fault_table_names_tests_that_exist():
    rows = [line for line in TABLE.read_text().splitlines() if line.startswith("| ") and "`tests/" in line]
    assert len(rows) >= 30
    for row in rows:
        named = NAMED.findall(row)
        assert named, f"a row without a test: {row[:80]}"
        for path, test in named:
            source = (REPO / path).read_text()
            assert re.search(rf"^def {test}\(", source, re.M), f"docs/faults.md names {path}::{test}, which does not exist"


def test_every_bad_input_test_is_in_the_fault_table():
    named = {test for _, test in NAMED.findall(TABLE.read_text())}
    tests = re.findall(r"^def (test_\w+)\(", (REPO / "tests" / "test_bad_inputs.py").read_text(), re.M)
    assert sorted(set(tests) - named) == []
