"""The offline text: calibration and evaluation docstrings never share a module, and the larger
unlabelled corpus for recover (parsed from sources) never contains a held-out docstring."""

from __future__ import annotations

import pytest

from onnxprune.stdlib_text import CALIBRATION_MODULES, EVALUATION_MODULES, docstrings, source_docstrings


def test_module_lists_are_disjoint():
    assert not set(CALIBRATION_MODULES) & set(EVALUATION_MODULES)


def test_docstrings_are_distinct_single_lines():
    lines = docstrings(("json", "csv"))
    assert len(lines) >= 10 and len(set(lines)) == len(lines)
    assert all("\n" not in line and len(line) >= 40 for line in lines)


@pytest.fixture(scope="module")
def stdlib_corpus():
    held_out = docstrings(EVALUATION_MODULES)
    return held_out, source_docstrings(packages=("stdlib",), exclude_lines=held_out)


def test_source_corpus_excludes_every_held_out_docstring(stdlib_corpus):
    held_out, corpus = stdlib_corpus
    assert len(corpus) > 3 * len(docstrings(CALIBRATION_MODULES))  # the point: much more text
    assert not set(corpus) & set(held_out)
    assert len(set(corpus)) == len(corpus)


def test_source_corpus_skips_held_out_modules_and_their_twins(stdlib_corpus):
    import ast
    import sysconfig
    from pathlib import Path

    _, corpus = stdlib_corpus
    corpus = set(corpus)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # A private docstring of a held-out module (docstrings() only reads public objects, so the
    # line filter alone would let it through) and one of a held-out module's _py twin.
    for name in ("textwrap.py", "_pyio.py"):
        tree = ast.parse((stdlib / name).read_text())
        own = {" ".join(ast.get_docstring(n).split()) for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n)}
        own = {line for line in own if len(line) >= 40}
        assert own and not own & corpus, name
    # ...while a calibration module's private docstrings are in.
    tree = ast.parse((stdlib / "json" / "decoder.py").read_text())
    assert any(" ".join(ast.get_docstring(n).split()) in corpus for n in ast.walk(tree)
               if isinstance(n, ast.FunctionDef) and ast.get_docstring(n))
