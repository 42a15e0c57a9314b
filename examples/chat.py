"""A non-streaming chat completion against vergeai (run `vergeai serve --demo` first)."""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("VERGEAI_URL", "http://127.0.0.1:8080/v1"),
    api_key=os.environ["VERGEAI_KEY"],
)
reply = client.chat.completions.create(
    model=os.environ.get("VERGEAI_MODEL", "gemma3-270m"),
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=64,
)
print(reply.choices[0].message.content)
print(reply.usage)
