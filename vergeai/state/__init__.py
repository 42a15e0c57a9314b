"""The state directory: users, API keys and assistants in TOML, history in SQLite."""
