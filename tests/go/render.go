// render executes an Ollama Go chat template the way Ollama does, for tests/test_modelfile.py.
//
// It mirrors ollama/ollama template/template.go (Execute on the "messages" path, at commit
// fb30760): consecutive messages of one role are collated (tool messages excepted), system
// messages are joined into .System and stay in .Messages, tool-call arguments and tool properties
// are plain maps, and the only custom function is `json` (encoding/json.Marshal). Standard library
// only, so Debian's golang-go builds it with no network.
//
// stdin:  {"template": "...", "cases": [{"messages": [...], "tools": [...], "think": true|false|null}]}
//         messages and tools use Ollama's /api/chat JSON (role, content, thinking, tool_calls, ...).
// stdout: {"outputs": ["rendered prompt", ...]}; a case that fails to render is an error (exit 1).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// PropertyType is a JSON Schema type: one name or a list (api.PropertyType).
type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

type ToolProperty struct {
	AnyOf       []ToolProperty `json:"anyOf,omitempty"`
	Type        PropertyType   `json:"type,omitempty"`
	Items       any            `json:"items,omitempty"`
	Description string         `json:"description,omitempty"`
	Enum        []any          `json:"enum,omitempty"`
}

// templateArgs / templateProperties: maps that print as JSON (template.go's types of the same name).
type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(t)
	return string(b)
}

type templateProperties map[string]ToolProperty

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateToolCallFunction struct {
	Index     int          `json:"index"`
	Name      string       `json:"name"`
	Arguments templateArgs `json:"arguments"`
}

type templateToolCall struct {
	ID       string                   `json:"id"`
	Function templateToolCallFunction `json:"function"`
}

type templateMessage struct {
	Role       string             `json:"role"`
	Content    string             `json:"content"`
	Thinking   string             `json:"thinking"`
	ToolCalls  []templateToolCall `json:"tool_calls"`
	ToolName   string             `json:"tool_name"`
	ToolCallID string             `json:"tool_call_id"`
}

type chatCase struct {
	Messages []templateMessage `json:"messages"`
	Tools    []templateTool    `json:"tools"`
	Think    *bool             `json:"think"`
}

type input struct {
	Template string     `json:"template"`
	Cases    []chatCase `json:"cases"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// collate merges consecutive messages of one role (not tool) and joins the system messages.
func collate(msgs []templateMessage) (string, []*templateMessage) {
	var system []string
	var collated []*templateMessage
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func render(tmpl *template.Template, c chatCase) (string, error) {
	system, messages := collate(c.Messages)
	var tools []templateTool
	if len(c.Tools) > 0 {
		tools = c.Tools
	}
	var b strings.Builder
	err := tmpl.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      tools,
		"Response":   "",
		"Think":      c.Think != nil && *c.Think,
		"ThinkLevel": "",
		"IsThinkSet": c.Think != nil,
	})
	return b.String(), err
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "render: bad input:", err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render: template does not parse:", err)
		os.Exit(1)
	}
	outputs := []string{}
	for i, c := range in.Cases {
		out, err := render(tmpl, c)
		if err != nil {
			fmt.Fprintf(os.Stderr, "render: case %d: %v\n", i, err)
			os.Exit(1)
		}
		outputs = append(outputs, out)
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"outputs": outputs})
}
