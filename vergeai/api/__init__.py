"""The HTTP API: Starlette routes, request parsing and response shapes."""
