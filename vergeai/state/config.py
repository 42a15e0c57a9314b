"""config.toml in the state dir: server settings that command-line flags override."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vergeai.errors import StateError

FILE = "config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
CACHE_SCOPES = ("user", "key")  # whose prompts may share cached prefixes past the system prompt


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    certfile: str | None = None
    keyfile: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    metrics_public: bool = False
    grace_seconds: float = 30.0
    read_timeout: float = 30.0  # for a request's headers and body; also keep-alive idle
    max_connections: int = 512
    usage_days: int = 400  # how long the usage record keeps a request
    cache_scope: str = "user"
    store_mb_per_user: int = 256  # of chat history, and of stored responses, each
    load_timeout: float = 300.0  # seconds a request waits for its model to load
    memory_budget: int = 0  # bytes the loaded models may hold together; 0: no budget
    memory_wait: float = 60.0  # seconds a request waits for room in the memory budget
    saved_prefix_mb: int = 1024  # disk for unloaded models' cached prefixes; 0: none kept

    def check(self, where: str) -> ServerConfig:
        def bad(name: str, why: str) -> StateError:
            return StateError(f"{where}: {name}: {why}")

        if not 1 <= self.port <= 65535:
            raise bad("port", "must be between 1 and 65535")
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        if not 0 <= self.grace_seconds <= 3600:
            raise bad("grace_seconds", "must be between 0 and 3600")
        if not 1 <= self.read_timeout <= 3600:
            raise bad("read_timeout", "must be between 1 and 3600")
        if not 1 <= self.max_connections <= 1_000_000:
            raise bad("max_connections", "must be between 1 and 1000000")
        if self.cache_scope not in CACHE_SCOPES:
            raise bad("cache_scope", f"must be one of {', '.join(CACHE_SCOPES)}")
        if not 1 <= self.store_mb_per_user <= 1_000_000:
            raise bad("store_mb_per_user", "must be between 1 and 1000000")
        if not 1 <= self.load_timeout <= 86_400:
            raise bad("load_timeout", "must be between 1 and 86400")
        if not 0 <= self.memory_budget <= 1 << 50:
            raise bad("memory_budget", "must be a number of bytes, 0 for none")
        if not 0 <= self.saved_prefix_mb <= 1 << 30:
            raise bad("saved_prefix_mb", "must be a number of MiB, 0 for none")
        if not 0 <= self.memory_wait <= 3600:
            raise bad("memory_wait", "must be between 0 and 3600")
        if not 1 <= self.usage_days <= 36_500:
            raise bad("usage_days", "must be between 1 and 36500")
        if (self.certfile is None) != (self.keyfile is None):
            raise bad("certfile", "certfile and keyfile go together")
        return self


def load_config(state_dir: Path, overrides: dict[str, Any]) -> ServerConfig:
    """config.toml's values, then every override that is not None."""
    path = state_dir / FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        data = {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise StateError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc}") from exc
    known = {f.name: f for f in fields(ServerConfig)}
    config = ServerConfig()
    for key, value in data.items():
        if key not in known:
            raise StateError(f"{path}: {key}: unknown setting")
        default = getattr(config, key)
        expected: tuple[type, ...] = (str,) if default is None else (type(default),)
        if isinstance(default, float):
            expected = (int, float)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
            raise StateError(f"{path}: {key}: expected {expected[0].__name__}")
        setattr(config, key, value)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config.check(str(path))
