"""The LM text sources: disjoint calibration/evaluation halves of two domains, token windows, passkey prompts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from onnxprune import lm_text
from onnxprune.errors import OnnxpruneError


def test_pydoc_topics_alternate_between_the_splits():
    from pydoc_data.topics import topics

    calibration, evaluation = lm_text.pydoc_topics("calibration"), lm_text.pydoc_topics("evaluation")
    names = sorted(topics)
    assert evaluation == [topics[n] for n in names[1::2]] and calibration == [topics[n] for n in names[::2]]
    assert len(calibration) + len(evaluation) == len(topics)


def test_stdlib_modules_are_split_by_module_without_tests_or_pydoc():
    calibration, evaluation = lm_text.stdlib_modules("calibration"), lm_text.stdlib_modules("evaluation")
    assert not set(calibration) & set(evaluation)
    names = {p.name.removesuffix(".py") for p in calibration + evaluation}
    assert {"json", "os", "argparse"} <= names and not names & {"test", "pydoc_data", "site-packages"}
    assert abs(len(calibration) - len(evaluation)) <= 1


def test_stdlib_sources_are_read_lazily_and_skip_test_folders():
    first = list(itertools.islice(lm_text.stdlib_sources("evaluation"), 3))
    assert len(first) == 3 and all(isinstance(t, str) and t for t in first)
    evaluation = {p.name for p in lm_text.stdlib_modules("evaluation")}
    package = next(p for p in lm_text.stdlib_modules("evaluation") if p.is_dir() and any(p.rglob("test*/*.py")))
    assert package.name in evaluation  # a package with a test folder, whose tests the text leaves out
    test_file = next(p for p in package.rglob("*.py") if "test" in p.relative_to(package).parts[0])
    assert test_file.read_text(encoding="utf-8", errors="replace").strip() not in set(lm_text.stdlib_sources("evaluation"))


def test_unknown_split_or_domain_is_one_clear_error():
    with pytest.raises(OnnxpruneError, match="unknown split 'train'"):
        lm_text.pydoc_topics("train")
    with pytest.raises(OnnxpruneError, match="unknown text domain 'wiki'; the domains are pydoc, stdlib"):
        lm_text.texts("wiki", "evaluation")


def test_token_windows_cut_the_concatenated_documents_in_order():
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    documents = ["abc", "defgh", "ij", "never read"]
    windows = lm_text.token_windows(iter(documents), encode, length=4, count=3, separator="|")
    assert windows.dtype == np.int64 and windows.shape == (3, 4)
    assert "".join(map(chr, windows.ravel())) == "abc|defgh|ij"
    with pytest.raises(OnnxpruneError, match="has 13 tokens; 4 windows of 4 need 16"):
        lm_text.token_windows(documents[:3], encode, length=4, count=4, separator="|")


def test_passkey_is_five_digits_and_seeded():
    keys = [lm_text.passkey(np.random.default_rng(7)) for _ in range(2)]
    assert keys[0] == keys[1] and len(keys[0]) == 5 and keys[0].isdigit()


@pytest.mark.parametrize("depth, before", [(0.0, 0), (0.5, 5), (1.0, 10)])
def test_passkey_message_hides_the_key_at_its_depth(depth, before):
    message = lm_text.passkey_message("12345", depth, repeats=10)
    assert message.startswith(lm_text.PASSKEY_TASK) and message.endswith(lm_text.PASSKEY_QUESTION)
    head = message[len(lm_text.PASSKEY_TASK):message.index("The pass key is 12345")]
    assert head == lm_text.PASSKEY_FILLER * before
    assert message.count(lm_text.PASSKEY_FILLER) == 10 and message.count("12345") == 2


def test_passkey_depth_outside_the_text_is_refused():
    with pytest.raises(OnnxpruneError, match=r"depth must be in \[0, 1\]"):
        lm_text.passkey_message("12345", 1.5, repeats=3)
