#!/usr/bin/env bash
# A chat completion with curl; run `vergeai serve --demo` first and export VERGEAI_KEY.
set -euo pipefail
curl -sS "${VERGEAI_URL:-http://127.0.0.1:8080/v1}/chat/completions" \
  -H "Authorization: Bearer ${VERGEAI_KEY:?export VERGEAI_KEY=the key vergeai printed}" \
  -H "Content-Type: application/json" \
  -d '{"model": "'"${VERGEAI_MODEL:-gemma3-270m}"'", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}'
echo
