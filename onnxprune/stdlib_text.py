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


def docstrings(modules, min_chars: int = 40) -> list[str]:
    """One line per distinct docstring (whitespace collapsed) of the modules' public objects."""
    seen: set[str] = set()
    lines: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in _objects(module):
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            line = _SPACES.sub(" ", doc).strip()
            if len(line) >= min_chars and line not in seen:
                seen.add(line)
                lines.append(line)
    return lines
