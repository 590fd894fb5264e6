"""A bench's results file: a rerun writes its tables anew and keeps the notes written by hand below them."""

import pytest

bench = pytest.importorskip("benchmarks", reason="the sdist has no benchmarks")  # the checkout has
NOTES_MARK, write_results = bench.NOTES_MARK, bench.write_results


def test_a_rerun_keeps_the_notes_written_by_hand(tmp_path, capsys):
    out = tmp_path / "clock.md"
    write_results(out, "# run 1\n\n| a |\n")
    assert out.read_text() == "# run 1\n\n| a |\n"  # nothing kept: there was nothing to keep
    out.write_text(out.read_text() + f"\n{NOTES_MARK}\n\nWhat it says: a is fine.\n")
    write_results(out, "# run 2\n\n| b |")
    assert out.read_text() == f"# run 2\n\n| b |\n\n{NOTES_MARK}\n\nWhat it says: a is fine.\n"
    assert "check them against the new numbers" in capsys.readouterr().out
    write_results(out, "# run 3\n")  # kept again, once
    assert out.read_text().count(NOTES_MARK) == 1 and out.read_text().startswith("# run 3\n\n")
