"""Remote model workers: assistants answered by OpenAI-compatible servers on other hosts."""
