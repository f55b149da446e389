"""tools/eval_lm.py's methods at equal densities: the streaming band that fits a density, and the
kept shares it reports (on the calibration lengths, and at a length where the rule continues)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import cli_models
from test_selection import G, M, causal_stats, far_head, local_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import eval_lm  # noqa: E402


def test_the_streaming_band_is_the_widest_that_fits():
    stats = causal_stats(np.stack([local_head(), far_head()]))
    # 8 x 8 causal blocks (36): sink + diagonal = 15, each band step adds 7, 6, ...
    assert eval_lm.streaming_window(stats, 15 / 36, G, G) == (G, 0)
    assert eval_lm.streaming_window(stats, 22 / 36, G, G) == (G, G)
    assert eval_lm.streaming_window(stats, 0.3, G, G) == (0, 0)  # no sink fits: the diagonal alone


def test_kept_shares_of_a_pruned_and_a_dense_model(tmp_path):
    files = cli_models.pruned_encoder(tmp_path, sparsity=0.5)
    calibration, at_length = eval_lm.kept_shares(files["pruned"], cli_models.MAX_LENGTH)
    assert calibration == pytest.approx(at_length)  # the calibration inputs are all MAX_LENGTH long
    assert 0.4 < calibration < 0.7
    assert eval_lm.kept_shares(files["dense"], 64) == (None, None)


def test_kept_share_at_a_length_follows_the_rule(tmp_path):
    from onnxprune.model_io import save_model
    from onnxprune.prune import prune
    from onnxprune.stats import Stats

    files = cli_models.pruned_encoder(tmp_path)
    model, _ = prune(files["dense"], Stats.load(files["stats"]), block_size=16, method=None, pattern="streaming",
                     sink_tokens=16, window_tokens=0)
    save_model(model, tmp_path / "streaming.onnx")
    # non-causal (1, 0, 0, 1): the sink column, the global row and the rest of the diagonal
    m = 4 * cli_models.MAX_LENGTH // 16
    _, longer = eval_lm.kept_shares(tmp_path / "streaming.onnx", 4 * cli_models.MAX_LENGTH)
    assert longer == pytest.approx((3 * m - 2) / m**2)
