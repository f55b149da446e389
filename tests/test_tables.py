"""Terminal tables: aligned columns, numbers to the right, long names shortened from the left."""

from __future__ import annotations

from onnxprune.tables import MAX_TEXT, human_bytes, human_count, table


def test_alignment():
    text = table(("name", "ms", "note"), [("a", 1.5, "x"), ("longer", 12.25, None), ("b", "3.00x", "")])
    header, rule, *rows = text.splitlines()
    assert header.index("ms") + 2 == rows[1].index("12.25") + 5  # right-aligned under the header's end
    assert rows[0].index("1.5") == rows[1].index("12.25") + 2
    assert rows[1].rstrip().endswith("-")  # None
    assert set(rule.strip()) <= {"─", " "}


def test_long_names_keep_their_end():
    name = "/encoder/layer.11/attention/self/" + "x" * 40 + "/Softmax"
    first, last = table(("site", "reason"), [(name, name)]).splitlines()[2].split("  ", 2)[1:]
    assert first.startswith("…") and first.endswith("/Softmax") and len(first) == MAX_TEXT
    assert last.strip() == name  # the last column is never cut


def test_human_units():
    assert human_bytes(512) == "512 B" and human_bytes(3 * 1024 ** 3) == "3.0 GiB"
    assert human_count(1_550) == "1.55k" and human_count(110_000_000) == "110.00M"
