"""A streamed chat completion against vergeai (run `vergeai serve --demo` first)."""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("VERGEAI_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ["VERGEAI_KEY"],
)
stream = client.chat.completions.create(
    model=os.environ.get("VERGEAI_MODEL", "gemma3-270m"),
    messages=[{"role": "user", "content": "Write a haiku about the sea."}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
