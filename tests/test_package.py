"""The package's face: ``onnxprune.<name>`` is the real function (its signature and docstring),
even where a submodule has the same name, ``import onnxprune`` stays free of torch, and there is
one version."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import onnxprune

ROOT = Path(__file__).resolve().parents[1]

#: API name → the module that defines it.
DEFINED_IN = {
    "OnnxpruneError": "onnxprune.errors",
    "bench": "onnxprune.bench",
    "calibrate": "onnxprune.calibrate",
    "export": "onnxprune.export",
    "inspect": "onnxprune.inspect_model",
    "library_path": "onnxprune.runtime",
    "prune": "onnxprune.prune",
    "recover": "onnxprune.recover",
    "session": "onnxprune.runtime",
    "verify": "onnxprune.verify",
}


def _import_every_submodule() -> None:
    for info in pkgutil.walk_packages(onnxprune.__path__, "onnxprune."):
        importlib.import_module(info.name)


def test_all_lists_the_api():
    assert sorted(onnxprune.__all__) == sorted(DEFINED_IN)


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_every_name_is_the_real_object_after_importing_every_submodule(name):
    _import_every_submodule()
    obj = getattr(onnxprune, name)
    assert not isinstance(obj, types.ModuleType), f"onnxprune.{name} is a module"
    assert obj is getattr(importlib.import_module(DEFINED_IN[name]), name)
    assert obj.__module__ == DEFINED_IN[name] and obj.__name__ == name
    assert inspect.getdoc(obj)


def test_prune_has_its_real_signature():
    import onnxprune.prune  # noqa: F401 - the submodule of the same name must not replace the function

    from onnxprune.prune import prune

    assert onnxprune.prune is prune
    parameters = list(inspect.signature(onnxprune.prune).parameters)
    assert parameters == ["model_path", "stats", "sparsity", "block_size", "scope", "keep_diagonal", "stats_sha256",
                          "density", "method", "pattern", "sink_tokens", "window_tokens", "full_heads"]
    assert "args" not in parameters and "kwargs" not in parameters


def test_a_fresh_interpreter_gets_the_functions_and_no_torch():
    # Submodules imported first and by plain `import`, as a user's script might.
    code = ("import sys, types\n"
            "import onnxprune.prune, onnxprune.verify, onnxprune.export, onnxprune.bench, onnxprune.recover\n"
            "import onnxprune\n"
            "assert not any(isinstance(getattr(onnxprune, n), types.ModuleType) for n in onnxprune.__all__)\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_one_version_source():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    (entry,) = [e for e in pyproject["tool"]["dynamic-metadata"] if e["field"] == "version"]
    assert entry["provider"] == "scikit_build_core.metadata.regex"
    source = (ROOT / entry["input"]).read_text()
    # scikit-build-core's default pattern for a version
    found = re.findall(r'(?im)^(?:__version__|VERSION)(?: ?: ?str)? *= *([\'"])v?(.+?)\1', source)
    assert [v for _, v in found] == [onnxprune.__version__]


def test_the_build_backend_reads_that_version():
    regex = pytest.importorskip("scikit_build_core.metadata.regex")
    version = regex.dynamic_metadata("version", {"input": str(ROOT / "onnxprune" / "__init__.py")})
    assert version == onnxprune.__version__
