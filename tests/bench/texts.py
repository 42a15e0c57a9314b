"""Text the demo model cannot copy, made from what every Python install has.

- ``unique_words``: real English words in random order, none twice in one
  prompt, so no n-gram of the prompt repeats and an answer has nothing to
  copy from (speculation's drafts miss);
- ``prose``: real prose the demo model does not reproduce (the standard
  library's own documentation, which is not in this repository), for long
  prompts and for copy workloads on text other than the benchmark's passage.

Both are the same on every run of one Python version (3.11 here).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from functools import cache

# modules whose documentation gives the vocabulary; the first ones are long prose too
SOURCES = (
    "configparser", "fileinput", "statistics", "csv", "urllib.request", "argparse", "json",
    "subprocess", "decimal", "difflib", "doctest", "pickle", "logging", "threading", "email",
    "sqlite3", "collections", "itertools", "functools", "typing", "pathlib", "shutil",
    "tarfile", "zipfile", "http.client", "unittest", "socket", "ssl", "datetime", "calendar",
    "random", "textwrap", "string", "contextlib", "dataclasses", "enum", "heapq", "queue",
    "tempfile", "glob", "gettext", "locale", "codecs", "struct", "weakref", "inspect", "ast",
    "traceback", "warnings", "numbers", "fractions", "hashlib", "secrets", "base64", "html",
    "mailbox", "mimetypes", "imaplib", "smtplib", "uuid", "ipaddress", "shlex", "timeit",
    "platform", "selectors", "signal", "optparse", "filecmp", "plistlib", "zlib", "gzip",
)  # fmt: skip
PROSE = ("configparser", "fileinput", "statistics", "csv", "urllib.request", "argparse")


def _docs(name: str) -> list[str]:
    module = importlib.import_module(name)
    texts = [inspect.getdoc(module) or ""]
    for attr, value in sorted(vars(module).items()):
        if not attr.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value)):
            texts.append(inspect.getdoc(value) or "")
    return texts


@cache
def vocabulary() -> tuple[str, ...]:
    words: set[str] = set()
    for name in SOURCES:
        for text in _docs(name):
            words.update(re.findall(r"\b[a-z]{3,12}\b", text.lower()))
    return tuple(sorted(words))


def unique_words(tag: str, n: int) -> str:
    """``n`` different words in an order of the tag's; then what to do with them."""
    words = random.Random(tag).sample(vocabulary(), n)
    return f"{tag}: {' '.join(words)}. Summarize the text above in one sentence."


@cache
def prose(i: int, words: int) -> str:
    """About ``words`` words of documentation prose, from the i-th source on."""
    out: list[str] = []
    for name in PROSE[i % len(PROSE) :] + PROSE[: i % len(PROSE)]:
        for text in _docs(name):
            out += text.split()
            if len(out) >= words:
                return " ".join(out[:words])
    return " ".join(out)


def copy_prompt(i: int, tag: str) -> str:
    """A copy workload on the i-th prose text: rewrite it with one word changed."""
    text = prose(i, 220)
    word = next(w for w in text.split() if w.isalpha() and len(w) >= 7)
    return (
        f"({tag}) {text}\n\nRewrite the passage above exactly as it is, word for word, "
        f"except that the word '{word}' becomes '{word.upper()}'."
    )
