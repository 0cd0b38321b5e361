"""Qwen3.5's chat template as an Ollama Go template, for Ollama releases without `RENDERER qwen3.5`
and for the Hub's Ollama integration (a repo file named `template`).

Translated by hand from the Jinja template llama.cpp ships as `models/templates/Qwen3.5-4B.jinja`
(the one Qwen3.5-MoE checkpoints carry). Ollama executes it with `text/template` and the values of
`template.Execute` (ollama/ollama template/template.go): `.System` (all system messages joined),
`.Messages` (Role, Content, Thinking, ToolCalls with .Function.Name / .Function.Arguments, a map),
`.Tools` (Type, .Function.Name / Description / Parameters), `.Think` / `.IsThinkSet`; the only custom
function is `json` (Go's json.Marshal). tests/go/render.go feeds it the same way and
tests/test_modelfile.py compares the text with transformers' `apply_chat_template`, byte for byte.
It reads `.Thinking`, so it needs an Ollama with thinking support (0.9 and later).

What the Jinja template does that a Go template cannot, and what Ollama hands over differently:
- Contents are not trimmed (Jinja `|trim`): leading/trailing whitespace in a message stays.
- A `<think>…</think>` inside an assistant's content is not split out; Ollama passes reasoning
  separately as `.Thinking` (Jinja's `reasoning_content`), which is what is rendered.
- Tool properties and tool-call arguments come as Go maps, so they are rendered in sorted key order
  (Jinja keeps the caller's order); nested objects/arrays inside arguments and a property's `items`
  are written by `json`, i.e. compact (`{"a":1}`, where Python writes `{"a": 1}`), and `json`
  escapes `<`, `>` and `&` in strings as \\u003c, \\u003e, \\u0026.
- Ollama merges consecutive messages of the same role (except tool messages) before rendering.
- A user message that is itself a `<tool_response>` wrapper still counts as the last query.
- Images and videos are not rendered (text models only).
"""

QWEN35_TOOLS_PREAMBLE = "# Tools\n\nYou have access to the following functions:\n\n<tools>"
QWEN35_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested "
    "within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function call, "
    "but NOT after\n- If there is no function call available, answer the question like normal with your current "
    "knowledge and do not tell the user about function calls\n</IMPORTANT>"
)

# Strings of the Jinja template that identify it as Qwen3.5's (thinking, XML tool calls).
QWEN35_MARKERS = ("<|im_start|>", "reasoning_content", "<tool_call>\\n<function=", "<think>\\n\\n</think>")

# One tool as Python's json.dumps writes transformers' schema: {"type", "function": {"name",
# "description", "parameters": {"type", "properties": {name: {"type", "items", "enum",
# "description"}}, "required"}}} with ", " and ": " separators.
_TOOL_JSON = (
    '{"type": {{ json .Type }}, "function": {"name": {{ json .Function.Name }}'
    '{{ if .Function.Description }}, "description": {{ json .Function.Description }}{{ end }}'
    ', "parameters": {"type": {{ json .Function.Parameters.Type }}, "properties": {{ "{" }}'
    '{{ $sep := "" }}{{ range $name, $p := .Function.Parameters.Properties }}{{ $sep }}{{ $sep = ", " }}'
    '{{ json $name }}: {"type": {{ json $p.Type }}'
    '{{ if $p.Items }}, "items": {{ json $p.Items }}{{ end }}'
    '{{ if $p.Enum }}, "enum": [{{ range $j, $e := $p.Enum }}{{ if $j }}, {{ end }}{{ json $e }}{{ end }}]{{ end }}'
    '{{ if $p.Description }}, "description": {{ json $p.Description }}{{ end }}}'
    "{{ end }}}"
    '{{ if .Function.Parameters.Required }}, "required": ['
    '{{ range $j, $r := .Function.Parameters.Required }}{{ if $j }}, {{ end }}{{ json $r }}{{ end }}]{{ end }}'
    "}}}"
)

# A tool-call argument as Jinja's `value | string` (strings raw, True/False/None as Python prints
# them) or `value | tojson` for objects and arrays.
_ARGUMENT_VALUE = (
    '{{ $t := printf "%T" $v }}'
    '{{ if eq $t "string" }}{{ $v }}'
    '{{ else if eq $t "bool" }}{{ if $v }}True{{ else }}False{{ end }}'
    '{{ else if eq $t "<nil>" }}None'
    '{{ else if or (eq $t "map[string]interface {}") (eq $t "[]interface {}") }}{{ json $v }}'
    "{{ else }}{{ $v }}{{ end }}"
)

QWEN35_GO_TEMPLATE = (
    "{{- /* Qwen3.5 chat template (thinking, tools) for Ollama, translated from its Jinja template by rioquant */ -}}\n"
    # The last user turn: assistant turns after it show their thinking (Jinja's ns.last_query_index).
    "{{- $lastQuery := -1 }}{{ range $i, $m := .Messages }}{{ if eq $m.Role \"user\" }}{{ $lastQuery = $i }}{{ end }}{{ end }}\n"
    "{{- if .Tools }}<|im_start|>system\n" + QWEN35_TOOLS_PREAMBLE
    + "{{ range .Tools }}\n" + _TOOL_JSON + "{{ end }}" + QWEN35_TOOLS_POSTAMBLE
    + "{{ if .System }}\n\n{{ .System }}{{ end }}<|im_end|>\n"
    "{{ else if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
    "{{ end }}\n"
    "{{- $prev := \"\" }}\n"
    "{{- range $i, $m := .Messages }}\n"
    "{{- $rest := slice $.Messages $i }}{{ $last := eq (len $rest) 1 }}\n"
    "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n"
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n"
    "{{ if gt $i $lastQuery }}<think>\n{{ .Thinking }}\n</think>\n\n{{ end }}{{ .Content }}\n"
    "{{- range $j, $c := .ToolCalls }}{{ if $j }}\n{{ else if $m.Content }}\n\n{{ end }}"
    "<tool_call>\n<function={{ $c.Function.Name }}>\n"
    "{{ range $k, $v := $c.Function.Arguments }}<parameter={{ $k }}>\n" + _ARGUMENT_VALUE + "\n</parameter>\n{{ end }}"
    "</function>\n</tool_call>{{ end }}\n"
    "{{- if not $last }}<|im_end|>\n{{ end }}\n"
    "{{- else if eq .Role \"tool\" }}{{ if and $prev (ne $prev \"tool\") }}<|im_start|>user{{ end }}\n"
    "<tool_response>\n{{ .Content }}\n</tool_response>\n"
    "{{- if $last }}<|im_end|>\n{{ else if ne (index $rest 1).Role \"tool\" }}<|im_end|>\n{{ end }}\n"
    "{{- end }}\n"
    "{{- $prev = .Role }}\n"
    "{{- end }}\n"
    # The generation prompt, unless the last message is an assistant turn to continue (prefill).
    "{{- if ne $prev \"assistant\" }}<|im_start|>assistant\n"
    "{{ if and .IsThinkSet (not .Think) }}<think>\n\n</think>\n\n{{ else }}<think>\n{{ end }}\n"
    "{{- end }}"
)


def looks_like_qwen35(chat_template: str | None) -> bool:
    """True when a GGUF's `tokenizer.chat_template` is the Qwen3.5 template this translation follows."""
    return bool(chat_template) and all(m in chat_template for m in QWEN35_MARKERS)
