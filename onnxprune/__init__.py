"""onnxprune: data-informed block-sparse attention for portable ONNX models.

The Python API mirrors the command line: ``export``, ``calibrate``, ``prune``, ``inspect``,
``verify``, ``bench`` and ``recover``, plus ``library_path()`` and ``session()`` (an ONNX Runtime
session with the custom-op library registered). torch loads only when ``export`` or ``recover``
runs.

``onnxprune.prune`` and its kin are the functions; their modules, of the same names, are
reached with ``from onnxprune.prune import PruneReport`` or ``importlib.import_module``
(``import onnxprune.prune as m`` gives the function).
"""

# The one version: pyproject.toml reads it from here (scikit-build-core's regex provider), and
# modules imported below read it from the package, so it comes first.
__version__ = "0.1.0"

# Each `from` import below loads its submodule first, which sets the package attribute of that
# name to the module; the import then rebinds it to the function. A later `import onnxprune.prune`
# finds the module already loaded and leaves the attribute alone.
from onnxprune.bench import bench  # noqa: E402
from onnxprune.calibrate import calibrate  # noqa: E402
from onnxprune.errors import OnnxpruneError  # noqa: E402
from onnxprune.export import export  # noqa: E402
from onnxprune.inspect_model import inspect  # noqa: E402
from onnxprune.prune import prune  # noqa: E402
from onnxprune.recover import recover  # noqa: E402
from onnxprune.runtime import library_path, session  # noqa: E402
from onnxprune.verify import verify  # noqa: E402

__all__ = [
    "OnnxpruneError",
    "bench",
    "calibrate",
    "export",
    "inspect",
    "library_path",
    "prune",
    "recover",
    "session",
    "verify",
]
