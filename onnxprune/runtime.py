"""ONNX Runtime sessions with onnxprune's custom-op library registered."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from onnxprune import op_schema
from onnxprune.errors import OnnxpruneError

_LIBRARY_NAME = "libonnxprune_ops.so"

#: Which models of a comparison run with the library (``verify``/``bench`` ``--library``):
#: ``auto`` (those with onnxprune ops), ``none`` (pruned models run their op's function body),
#: ``a``/``b`` (only the first/second model).
LIBRARY_CHOICES = ("auto", "none", "a", "b")


def _installed_library() -> list[Path]:
    """The library where the installed distribution's file list (RECORD) puts it.

    Python run in a checkout's root imports the source tree, which has no built ``lib/``, ahead
    of the installed package; the installed distribution still holds the library that
    ``pip install .`` (``make install``) built.
    """
    from importlib import metadata

    try:
        installed = metadata.distribution("onnxprune")
    except metadata.PackageNotFoundError:
        return []
    return [Path(installed.locate_file(f)) for f in installed.files or [] if f.name == _LIBRARY_NAME]


def _candidates() -> list[Path]:
    """Where the library may be, in order: ``ONNXPRUNE_LIBRARY``, the imported package's
    ``lib/`` (also the redirect of an editable install), the installed distribution's file."""
    package_dir = Path(__file__).resolve().parent
    found = []
    if os.environ.get("ONNXPRUNE_LIBRARY"):
        found.append(Path(os.environ["ONNXPRUNE_LIBRARY"]))
    import onnxprune

    for entry in getattr(onnxprune, "__path__", [str(package_dir)]):
        found.append(Path(entry) / "lib" / _LIBRARY_NAME)
    found.extend(c for c in _installed_library() if c not in found)
    return found


def library_path() -> str:
    """Path of ``libonnxprune_ops.so``, the custom-op library built with the package.

    ``ONNXPRUNE_LIBRARY`` overrides it (a library built by hand, say).
    """
    candidates = _candidates()
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise OnnxpruneError(
        "onnxprune's custom-op library is not built (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install the package with `pip install .` or run `make install`"
    )


def session_options(threads: int | None = None, with_library: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Failures reach the caller as exceptions; ORT's own error log would print them twice.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if with_library:
        options.register_custom_ops_library(library_path())
    return options


def session(
    path_or_bytes,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    with_library: bool = True,
    options=None,
):
    """An ``onnxruntime.InferenceSession`` with the library registered.

    ``path_or_bytes``: a path, the model's bytes, or the ``model_io.ModelInfo`` of a file already
    read, which is also checked for an op version newer than this library runs (ONNX Runtime
    would give such a node this library's kernel regardless). The pruned file also runs without
    the library (the op's function body): pass ``with_library=False`` to get that dense-speed
    fallback.
    """
    import onnxruntime as ort

    from onnxprune.model_io import ModelInfo

    if isinstance(path_or_bytes, ModelInfo):
        version = path_or_bytes.opset(op_schema.DOMAIN)
        if version is not None and version > op_schema.OPSET_VERSION:
            raise OnnxpruneError(
                f"{path_or_bytes.path}: uses {op_schema.DOMAIN} opset {version}; this onnxprune runs up to "
                f"{op_schema.OPSET_VERSION}: upgrade onnxprune"
            )
        path_or_bytes = path_or_bytes.path

    if options is None:
        options = session_options(threads, with_library)
    elif with_library:
        options.register_custom_ops_library(library_path())
    source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
    try:
        return ort.InferenceSession(source, options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # ORT raises its own exception types for bad models
        raise OnnxpruneError(f"ONNX Runtime cannot load the model: {e}".splitlines()[0]) from None


def run(sess, feeds: dict, model: str | os.PathLike = "the model") -> list:
    """``sess.run(None, feeds)``, with ONNX Runtime's failure (a bad input size, say) as one line."""
    try:
        return sess.run(None, feeds)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidArgument, ...)
        if "onnxruntime" not in type(e).__module__:
            raise
        raise OnnxpruneError(f"ONNX Runtime failed running {model}: " + " ".join(str(e).split())) from None
