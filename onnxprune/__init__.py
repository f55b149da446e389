"""onnxprune: data-informed block-sparse attention for portable ONNX models.

The Python API mirrors the command line: ``export``, ``calibrate``, ``prune``, ``inspect``,
``verify``, ``bench``, plus ``library_path()`` and ``session()`` (an ONNX Runtime session with the
custom-op library registered). Heavy dependencies (torch) load only when a verb needs them.
"""

__version__ = "0.1.0"

from onnxprune.errors import OnnxpruneError  # noqa: E402
from onnxprune.runtime import library_path, session  # noqa: E402


def export(*args, **kwargs):
    from onnxprune.export import export as _export

    return _export(*args, **kwargs)


def calibrate(*args, **kwargs):
    from onnxprune.calibrate import calibrate as _calibrate

    return _calibrate(*args, **kwargs)


def prune(*args, **kwargs):
    from onnxprune.prune import prune as _prune

    return _prune(*args, **kwargs)


def inspect(*args, **kwargs):
    from onnxprune.inspect_model import inspect as _inspect

    return _inspect(*args, **kwargs)


def verify(*args, **kwargs):
    from onnxprune.verify import compare_outputs

    return compare_outputs(*args, **kwargs)


def bench(*args, **kwargs):
    from onnxprune.bench import bench as _bench

    return _bench(*args, **kwargs)


__all__ = ["OnnxpruneError", "bench", "calibrate", "export", "inspect", "library_path", "prune", "session", "verify"]
