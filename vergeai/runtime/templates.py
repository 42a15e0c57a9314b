"""Chat templates for ``--chat-format`` names, for GGUFs that carry none."""

from __future__ import annotations

GEMMA = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set first_user_prefix = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{%- set content = (first_user_prefix if loop.first else '') + message['content'] -%}
{{ '<start_of_turn>' + role + '\n' + content | trim + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<start_of_turn>model\n' }}
{%- endif -%}"""

CHATML = """{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|im_start|>assistant\n' }}
{%- endif -%}"""

LLAMA3 = """{{ bos_token }}
{%- for message in messages -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
{{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif -%}"""

MISTRAL = """{{ bos_token }}
{%- set system = (messages[0]['content'] + '\n\n') if messages[0]['role'] == 'system' else '' -%}
{%- for message in messages if message['role'] != 'system' -%}
{%- if message['role'] == 'user' -%}
{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}
{%- else -%}
{{ message['content'] + eos_token }}
{%- endif -%}
{%- endfor -%}"""

BUILTIN: dict[str, str] = {
    "gemma": GEMMA,
    "chatml": CHATML,
    "llama-3": LLAMA3,
    "mistral-instruct": MISTRAL,
}
