"""The records kept in the state directory, by the names other packages import them.

The records live by concern: the field schema and its checks in
:mod:`vergeai.state.schema`, users and keys in :mod:`vergeai.state.accounts`,
assistants in :mod:`vergeai.state.assistants`.
"""

from vergeai.state.accounts import ApiKey, User
from vergeai.state.assistants import Assistant
from vergeai.state.schema import now

__all__ = ["ApiKey", "Assistant", "User", "now"]
