"""Where ``library_path()`` finds the custom-op library: ``ONNXPRUNE_LIBRARY``, the imported
package's ``lib/``, then the installed distribution's file (a checkout's source tree, which has
no built ``lib/``, shadows the installed package when Python runs in the checkout's root)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import onnxprune
from onnxprune.errors import OnnxpruneError
from onnxprune.runtime import library_path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "libonnxprune_ops.so"


def _fake_install(site: Path, record_path: str = f"onnxprune/lib/{LIBRARY}") -> Path:
    """A site-packages with an onnxprune distribution whose RECORD lists the library; its path."""
    info = site / "onnxprune-0.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxprune\nVersion: 0.0.0\n")
    (info / "RECORD").write_text(f"onnxprune/__init__.py,,\n{record_path},,\n{info.name}/RECORD,,\n")
    library = site / record_path
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF")
    return library


@pytest.fixture
def shadowed(tmp_path, monkeypatch):
    """The imported package is a source tree without lib/; the installed one is in ``site``."""
    monkeypatch.delenv("ONNXPRUNE_LIBRARY", raising=False)
    source = tmp_path / "checkout" / "onnxprune"
    source.mkdir(parents=True)
    monkeypatch.setattr(onnxprune, "__path__", [str(source)])
    site = tmp_path / "site-packages"
    library = _fake_install(site)
    installed = importlib.metadata.PathDistribution(site / "onnxprune-0.0.0.dist-info")
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: installed)
    return {"source": source, "site": site, "library": library}


def test_installed_library_when_the_source_tree_shadows_the_package(shadowed):
    assert library_path() == str(shadowed["library"])


def test_any_install_directory_the_record_names(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXPRUNE_LIBRARY", raising=False)
    monkeypatch.setattr(onnxprune, "__path__", [str(tmp_path / "src")])
    library = _fake_install(tmp_path / "site", record_path=f"elsewhere/{LIBRARY}")
    installed = importlib.metadata.PathDistribution(tmp_path / "site" / "onnxprune-0.0.0.dist-info")
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: installed)
    assert library_path() == str(library)


def test_package_lib_comes_before_the_installed_one(shadowed):
    built = shadowed["source"] / "lib" / LIBRARY
    built.parent.mkdir()
    built.write_bytes(b"\x7fELF")
    assert library_path() == str(built)


def test_environment_variable_comes_first(shadowed, tmp_path, monkeypatch):
    chosen = tmp_path / "by-hand.so"
    chosen.write_bytes(b"\x7fELF")
    monkeypatch.setenv("ONNXPRUNE_LIBRARY", str(chosen))
    assert library_path() == str(chosen)


def test_not_installed_names_every_place_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("ONNXPRUNE_LIBRARY", raising=False)
    monkeypatch.setattr(onnxprune, "__path__", [str(tmp_path / "src")])

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(OnnxpruneError, match="not built") as info:
        library_path()
    assert str(tmp_path / "src" / "lib" / LIBRARY) in str(info.value) and "pip install ." in str(info.value)


def _installed_library() -> Path | None:
    try:
        installed = importlib.metadata.distribution("onnxprune")
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(installed.locate_file(f)) for f in installed.files or [] if f.name == LIBRARY]
    return found[0] if found and found[0].is_file() else None


@pytest.mark.skipif(_installed_library() is None, reason="onnxprune is not installed with its library")
def test_from_the_checkout_root_after_install():
    """What `make test` leaves: the package installed, Python run in the checkout's root."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXPRUNE_LIBRARY", "PYTHONPATH")}
    code = "import onnxprune; print(onnxprune.__file__); print(onnxprune.library_path())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    imported, found = result.stdout.split()
    assert Path(imported).is_relative_to(ROOT)  # the source tree, not the installed package
    assert Path(found).is_file()
