"""Real English text available offline: docstrings of Python's standard library, read at run time.

The modules are a fixed list (importing arbitrary stdlib modules has side effects), split in two
disjoint halves so that calibration and evaluation never share a module.
"""

from __future__ import annotations

import importlib
import inspect
import re

#: Modules whose docstrings calibrate; disjoint from EVALUATION_MODULES.
CALIBRATION_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools",
    "http.client", "inspect", "json", "logging", "pathlib", "pickle", "re", "shutil", "socket",
    "sqlite3", "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.request",
    "xml.etree.ElementTree", "zipfile", "configparser", "difflib", "enum", "heapq",
)
#: Held-out modules for evaluating pruned models.
EVALUATION_MODULES = (
    "abc", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "contextlib", "copy",
    "dataclasses", "fractions", "ftplib", "getopt", "gettext", "glob", "gzip", "hashlib", "hmac",
    "imaplib", "io", "ipaddress", "itertools", "mailbox", "math", "mimetypes", "operator",
    "optparse", "os", "pdb", "platform", "poplib", "pprint", "queue", "random", "sched",
    "secrets", "selectors", "shelve", "shlex", "smtplib", "statistics", "string", "struct",
    "tempfile", "textwrap", "timeit", "tokenize", "trace", "traceback", "uuid", "warnings",
    "weakref", "wave", "zlib",
)

_SPACES = re.compile(r"\s+")


def _objects(module):
    yield module
    for _, member in inspect.getmembers(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(member):
            yield member
            for _, attr in inspect.getmembers(member):
                if inspect.isfunction(attr) or inspect.ismethoddescriptor(attr):
                    yield attr
        elif inspect.isfunction(member):
            yield member


def _one_line(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _distinct_lines(docs, min_chars: int, excluded=frozenset()) -> list[str]:
    """Each docstring as one line (whitespace collapsed), first occurrence only, at least
    ``min_chars`` long and not in ``excluded``; in the order given."""
    seen: set[str] = set()
    lines: list[str] = []
    for doc in docs:
        line = _one_line(doc) if doc else ""
        if len(line) >= min_chars and line not in seen and line not in excluded:
            seen.add(line)
            lines.append(line)
    return lines


def _imported_docs(modules):
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in _objects(module):
            yield inspect.getdoc(obj)


def docstrings(modules, min_chars: int = 40) -> list[str]:
    """One line per distinct docstring (whitespace collapsed) of the modules' public objects."""
    return _distinct_lines(_imported_docs(modules), min_chars)


def _package_folder(name: str):
    """The folder of an installed package (``"stdlib"``: the standard library), or None."""
    import importlib.util
    import sysconfig
    from pathlib import Path

    if name == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    spec = importlib.util.find_spec(name)
    return Path(spec.origin).parent if spec and spec.origin else None


def source_docstrings(packages=("stdlib", "torch"), exclude_modules=EVALUATION_MODULES, exclude_lines=(),
                      min_chars: int = 40) -> list[str]:
    """Docstrings parsed (not imported: no side effects) from the packages' source files.

    Unlabelled text for ``recover`` in volume: the standard library's (pinned by the Python version)
    and torch's (pinned by the install) modules, functions and classes, private ones included —
    about 17 000 lines against the 1 356 that the calibration modules' public objects give.
    The held-out modules never contribute: files of ``exclude_modules`` (and their ``_name`` /
    ``_pyname`` twins, which carry the same docstrings) are skipped, as are test folders, and any
    line equal to one of ``exclude_lines`` is dropped.
    """
    import ast

    skip_tops = {m.split(".")[0] for m in exclude_modules}
    skip_tops |= {f"_{m}" for m in skip_tops} | {f"_py{m}" for m in skip_tops}

    def parsed_docs():
        for package in packages:
            folder = _package_folder(package)
            if folder is None:
                continue
            for path in sorted(folder.rglob("*.py")):
                parts = path.relative_to(folder).parts
                if package == "stdlib" and (parts[0] == "site-packages" or parts[0].removesuffix(".py") in skip_tops):
                    continue
                if any(p in ("test", "tests", "testing", "idlelib", "turtledemo") for p in parts[:-1]):
                    continue
                try:
                    tree = ast.parse(path.read_bytes())
                except (SyntaxError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield ast.get_docstring(node)

    return _distinct_lines(parsed_docs(), min_chars, {_one_line(line) for line in exclude_lines})
