"""An upstream's API key: from the environment, else from the state dir's secrets.toml.

The key is looked up by name on every use, so a rotated key applies without
a restart, and it lives only in memory: never in assistants.toml, a log line
or an error message.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from pathlib import Path

log = logging.getLogger("vergeai.upstream")

SECRETS_FILE = "secrets.toml"


def upstream_key(var: str | None, root: Path | None) -> str | None:
    """The key named ``var``: the environment variable, else secrets.toml's entry; or None."""
    if var is None:
        return None
    value = os.environ.get(var)
    if value:
        return value
    return _from_file(var, root / SECRETS_FILE) if root is not None else None


def _from_file(var: str, path: Path) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc.strerror)
        return None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by others (chmod 600 it); its keys are not used", path)
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("cannot read %s: %s", path, type(exc).__name__)  # never its text
        return None
    value = data.get(var)
    return value if isinstance(value, str) and value else None
