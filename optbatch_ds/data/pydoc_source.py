"""Real text that every Python installation carries: the standard library's docstrings and `pydoc_data.topics`.

    apis = api_docs()           # [ApiDoc("posixpath.basename", "posixpath", "function", "(p)", "Returns ...", doc)]
    passages = topic_passages() # [Passage("topic:assert:0", "Assert statements are a convenient way to ...")]

The source of the pydoc instruction set (pydoc_demo.py). Read from the running interpreter with `inspect`, over
MODULES: standard-library modules present on CPython 3.10-3.12 whose import has no side effects and that are
not deprecated. Only public functions, classes and the public methods of those classes that are defined in the
module itself (not re-exported, not patched in by a third-party package) and carry their own docstring are read. The result is deterministic for a given
Python version and platform (docstrings change between versions; `os` wraps the platform's calls); MODULES that
cannot be imported (a build without sqlite3) are left out and listed by `missing_modules()`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from dataclasses import dataclass

MODULES = (
    "abc", "argparse", "array", "asyncio", "base64", "binascii", "bisect", "builtins", "bz2", "calendar", "cmath",
    "codecs", "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum", "errno",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "keyword", "locale", "logging", "lzma", "math", "mimetypes", "numbers", "operator",
    "optparse", "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "posixpath", "pprint", "queue",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "signal", "smtplib", "socket",
    "socketserver", "sqlite3", "stat", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "tracemalloc", "types", "typing",
    "unicodedata", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)
_ALSO_HOME = {"os": ("posix", "nt"), "posixpath": ("genericpath",)}
MIN_WORDS, MAX_WORDS = 3, 15  # a summary (first sentence) this long is a short answer and still says something

# A first paragraph like "gethostbyname(host) -> address" or "chain(*iterables) --> chain object" is a signature.
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)|-->|->")
_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z(\"'])|[.!?](?=\n)|[.!?]$")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "approx.", "resp.")
_PLAIN = re.compile(r"^[A-Z][A-Za-z0-9 .,;:'\"()\[\]_\-/+=<>%!?]*$")  # no reST markup, ASCII, starts a sentence


@dataclass(frozen=True)
class ApiDoc:
    """One documented function, class or method."""

    name: str       # "posixpath.basename", "collections.OrderedDict", "str.lower" (builtins without a prefix)
    module: str     # the MODULES entry it was read from: "posixpath", "collections", "builtins"
    kind: str       # "function", "class" or "method"
    signature: str  # "(p)", or "" where inspect cannot tell (or its text would not be reproducible)
    summary: str    # the first sentence of the docstring, MIN_WORDS..MAX_WORDS words, ending in "."
    doc: str        # the docstring from that sentence on, paragraphs joined by "\n\n", whitespace normalised


@dataclass(frozen=True)
class Passage:
    """A paragraph of prose from pydoc_data.topics (the language reference that `help("assert")` shows)."""

    source: str     # "topic:<topic>:<paragraph index>"
    text: str       # whitespace normalised


def first_sentence(text: str) -> str:
    """The text up to and including its first sentence end (".", "!" or "?" before a capital, a line break or
    the end), not counting abbreviations such as "e.g."; the whole text when no sentence end is found."""
    for m in _SENTENCE_END.finditer(text):
        if not text[: m.end()].endswith(_ABBREVIATIONS):
            return text[: m.end()]
    return text


def _paragraphs(doc: str) -> list[str]:
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _summary_and_doc(doc: str) -> tuple[str, str] | None:
    """(summary, doc from the summary on) of a cleaned docstring, or None when it has no usable first sentence."""
    paras = _paragraphs(doc)
    while paras and _SIGNATURE.search(first_sentence(paras[0])):
        paras = paras[1:]
    if not paras:
        return None
    summary = first_sentence(paras[0])
    if summary[-1] not in ".!?":
        summary += "."
    if not (MIN_WORDS <= len(summary.split()) <= MAX_WORDS and _PLAIN.match(summary)):
        return None
    return summary, "\n\n".join([summary + paras[0][len(first_sentence(paras[0])):]] + paras[1:])


def _own_doc(obj) -> str | None:
    """The object's own docstring, cleaned (a class without one would inherit its base's through inspect.getdoc)."""
    if inspect.isclass(obj) and "__doc__" not in vars(obj):
        return None
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _signature(obj) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return "" if "0x" in text or len(text) > 80 else text  # object reprs carry addresses: not reproducible


def _defined_here(obj, module: str) -> bool:
    """Defined in `module`, in one of its submodules, in its C accelerator ("_heapq" for heapq) or in the private
    module it wraps ("posix" for os); not a name it imported from elsewhere."""
    home = getattr(obj, "__module__", None) or module
    return (home == module or home.startswith(module + ".") or home.lstrip("_") == module.rsplit(".", 1)[-1]
            or home in _ALSO_HOME.get(module, ()))


def _members(module_name: str):
    """(qualified name, kind, object) of the module's public functions, classes and those classes' methods, each
    defined by the module itself: a method another package patched in (transformers adds Logger.warning_once)
    would make the set depend on what the process imported before."""
    module = importlib.import_module(module_name)
    prefix = "" if module_name == "builtins" else module_name + "."
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
            continue
        if not _defined_here(obj, module_name):
            continue
        yield prefix + name, "class" if inspect.isclass(obj) else "function", obj
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if not attr.startswith("_") and inspect.isroutine(member) and _defined_here(member, module_name):
                    yield f"{prefix}{name}.{attr}", "method", member


def _read(module: str, name: str, kind: str, obj) -> ApiDoc | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        doc = _own_doc(obj)
        parts = _summary_and_doc(doc) if doc else None
        signature = _signature(obj) if parts and kind != "class" else ""
    if caught or parts is None:  # a deprecated alias warns when touched: leave it out
        return None
    return ApiDoc(name, module, kind, signature, *parts)


def missing_modules() -> list[str]:
    """MODULES this interpreter cannot import."""
    out = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            out.append(name)
    return out


def _read_api_docs() -> list[ApiDoc]:
    """api_docs() read in this process (see api_docs for why it runs in a fresh one)."""
    seen, found = set(), []
    missing = set(missing_modules())
    for module_name in MODULES:
        if module_name in missing:
            continue
        for name, kind, obj in _members(module_name):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            api = _read(module_name, name, kind, obj)
            if api is not None:
                found.append(api)
    shared = Counter(a.summary.lower() for a in found)
    return sorted((a for a in found if shared[a.summary.lower()] == 1), key=lambda a: a.name)


@functools.lru_cache(maxsize=1)
def api_docs() -> tuple[ApiDoc, ...]:
    """Every documented API of MODULES with a usable summary, sorted by name. An object reachable under several
    names is kept under the first; APIs whose summary another API shares are dropped (a question about it
    would have several right answers).

    Read in a fresh interpreter (this file run with python -I -S: the standard library only), because what a
    module holds depends on what the process imported before: torch replaces inspect.getfile, and importing
    concurrent.futures.thread puts ThreadPoolExecutor into concurrent.futures. Raises RuntimeError when that
    interpreter fails."""
    proc = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading the standard library's docstrings failed:\n{proc.stderr[-2000:]}")
    return tuple(ApiDoc(*row) for row in json.loads(proc.stdout))


def topic_passages() -> list[Passage]:
    """The distinct prose paragraphs of pydoc_data.topics: not headings, grammar rules or indented code, at least
    2 sentences, starting with a summary sentence of MIN_WORDS..MAX_WORDS words; in topic order."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for topic in sorted(topics):
        for i, block in enumerate(re.split(r"\n\s*\n", topics[topic])):
            if not block.strip() or block.startswith((" ", "\t")) or "::=" in block or "***" in block:
                continue
            text = " ".join(block.split())
            head = first_sentence(text)
            if text not in seen and head != text and MIN_WORDS <= len(head.split()) <= MAX_WORDS and _PLAIN.match(head):
                seen.add(text)  # several topics repeat a paragraph: keep its first
                out.append(Passage(f"topic:{topic}:{i}", text))
    return out


if __name__ == "__main__":  # api_docs() runs this file in a fresh interpreter
    print(json.dumps([dataclasses.astuple(a) for a in _read_api_docs()]))
