"""`rioquant modelfile` and the Go chat template, against independent references.

The Go TEMPLATE (rioquant.publish.gotemplate) is executed by Go's own text/template
(tests/go/render.go, fed the way Ollama feeds it) and compared byte for byte with the Jinja chat
template the GGUF carries, rendered by transformers' `apply_chat_template`, on named conversations:
system prompts, thinking on/off, history whose reasoning is dropped, tools with parallel calls and
typed arguments, tool results, a prefilled answer. The cases stay inside the domain the module
docstring of gotemplate.py promises (no surrounding whitespace, sorted argument and property names,
no nested argument values); outside it the differences are the documented ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rioquant.cli import main
from rioquant.errors import PublishError
from rioquant.files.gguf_file import read_header
from rioquant.publish.gotemplate import QWEN35_GO_TEMPLATE
from rioquant.publish.modelfile import PRESETS, modelfile_text
from rioquant.testing.tokenizer import tokenizer_files
from tests.publish_files import qwen35_template, tiny_release, write_gguf

GO_SOURCE = Path(__file__).parent / "go" / "render.go"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"},
    }, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {
    "name": "now", "description": "Current time",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "description": "IANA zone"}}}}}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# Named conversations (HF chat format). `think`: None = the template's default, else enable_thinking.
CONVERSATIONS: dict[str, dict] = {
    "system-user": dict(messages=[{"role": "system", "content": "You are terse."},
                                  {"role": "user", "content": "Hi there"}]),
    "user-thinking-off": dict(messages=[{"role": "user", "content": "Hi"}], think=False),
    "user-thinking-on": dict(messages=[{"role": "user", "content": "Hi"}], think=True),
    "history-reasoning-dropped": dict(messages=[
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Easy sum."},
        {"role": "user", "content": "and 3+3?"}]),
    "tools-system-parallel-calls": dict(tools=[WEATHER, CLOCK], messages=[
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": "Let me check both.", "reasoning_content": "Two calls needed.",
         "tool_calls": [call("get_weather", city="Paris", days=3, metric=True, note=None, ratio=2.5),
                        call("get_weather", city="Lyon", unit="celsius")]},
        {"role": "tool", "content": "18C sunny"},
        {"role": "tool", "content": "20C cloudy"}]),
    "tools-empty-content-call-then-answer": dict(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="Rome")]},
        {"role": "tool", "content": "hot"},
        {"role": "assistant", "content": "It is hot in Rome.", "reasoning_content": "Report it."},
        {"role": "user", "content": "Thanks! And tomorrow?"}]),
    "tool-result-then-user": dict(tools=[CLOCK], messages=[
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "", "tool_calls": [call("now", tz="Europe/Paris")]},
        {"role": "tool", "content": "12:00"},
        {"role": "user", "content": "Say it in words."}], think=False),
    "prefill": dict(prefill=True, messages=[
        {"role": "user", "content": "Write a haiku about autumn"},
        {"role": "assistant", "content": "Crisp leaves drift", "reasoning_content": "Five syllables first."}]),
    "unicode-and-quotes": dict(messages=[
        {"role": "system", "content": 'Answer "briefly", in the user\'s language.'},
        {"role": "user", "content": "Wie spät ist es? 今何時ですか 🕰️"}]),
}


def to_ollama(message: dict) -> dict:
    """An HF chat message as Ollama's /api/chat JSON: reasoning_content → thinking."""
    out = {"role": message["role"], "content": message.get("content") or ""}
    if message.get("reasoning_content"):
        out["thinking"] = message["reasoning_content"]
    if message.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                             for c in message["tool_calls"]]
    return out


@pytest.fixture(scope="session")
def go_render(tmp_path_factory) -> Path:
    """tests/go/render.go built with the system's Go (Debian golang-go; `make install` adds it as root)."""
    go = shutil.which("go")
    if go is None:
        pytest.fail("go not found: tests/test_modelfile.py renders the template with Go's text/template; "
                    "run `make install` as root or `apt-get install golang-go`")
    out = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOCACHE": str(out / "cache"), "GOPATH": str(out / "gopath")}
    subprocess.run([go, "build", "-o", str(out / "render"), str(GO_SOURCE)], check=True, env=env, cwd=out,
                   timeout=300)
    return out / "render"


def render_go(binary: Path, template: str, cases: list[dict]) -> list[str]:
    payload = {"template": template, "cases": [
        {"messages": [to_ollama(m) for m in c["messages"]], "tools": c.get("tools"), "think": c.get("think")}
        for c in cases]}
    result = subprocess.run([str(binary)], input=json.dumps(payload), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["outputs"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_files()))


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return tiny_release(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def go_outputs(go_render) -> dict[str, str]:
    names = list(CONVERSATIONS)
    return dict(zip(names, render_go(go_render, QWEN35_GO_TEMPLATE, [CONVERSATIONS[n] for n in names]), strict=True))


def render_jinja(tokenizer, chat_template: str, case: dict) -> str:
    kwargs = {} if case.get("think") is None else {"enable_thinking": case["think"]}
    return tokenizer.apply_chat_template(
        case["messages"], tools=case.get("tools"), chat_template=chat_template, tokenize=False,
        add_generation_prompt=not case.get("prefill"), continue_final_message=bool(case.get("prefill")), **kwargs)


def assert_same_text(go: str, jinja: str) -> None:
    if go == jinja:
        return
    at = next((i for i, (a, b) in enumerate(zip(go, jinja, strict=False)) if a != b), min(len(go), len(jinja)))
    pytest.fail(f"Go and Jinja renderings differ at char {at} (lengths {len(go)} / {len(jinja)}):\n"
                f"  go:    {go[max(0, at - 60): at + 60]!r}\n  jinja: {jinja[max(0, at - 60): at + 60]!r}")


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_go_template_renders_like_the_gguf_chat_template(name, go_outputs, tokenizer, release):
    chat_template = read_header(release).metadata.get("tokenizer.chat_template")
    assert chat_template == qwen35_template()
    assert_same_text(go_outputs[name], render_jinja(tokenizer, chat_template, CONVERSATIONS[name]))


def test_modelfile_for_ollama_030(release, tmp_path):
    out = tmp_path / "Modelfile"
    text = modelfile_text(release, out, num_ctx=8192)
    lines = text.splitlines()
    assert f"FROM {release.resolve()}" in lines  # not under the Modelfile's folder: absolute
    assert "RENDERER qwen3.5" in lines and "PARSER qwen3.5" in lines
    assert not any(line.startswith("TEMPLATE") for line in lines)
    # generation_config.json of the tiny checkpoint: temperature 0.6, top_p 0.95, top_k 20
    params = [line.split(" ", 2)[1:] for line in lines if line.startswith("PARAMETER ")]
    assert params == [["temperature", "0.6"], ["top_p", "0.95"], ["top_k", "20"], ["presence_penalty", "1.5"],
                      ["num_ctx", "8192"], ["stop", '"<|im_end|>"'], ["stop", '"<|endoftext|>"']]
    assert not any(line.startswith("LICENSE") for line in lines)  # the tiny checkpoint has no licence


def test_modelfile_names_the_first_shard_and_the_gguf_licence(tmp_path):
    files = write_gguf(tmp_path / "m" / "hand-Q8_0.gguf", chat_template=qwen35_template(), split_max_tensors=2,
                       license="apache-2.0", license_link="https://example.org/LICENSE",
                       sampling={"temp": 0.7, "top_p": 0.8})
    assert len(files) == 2
    text = modelfile_text(files[1], tmp_path / "m" / "Modelfile", preset="coding")
    lines = text.splitlines()
    assert "FROM ./hand-Q8_0-00001-of-00002.gguf" in lines
    coding = PRESETS["coding"]  # a named preset wins over the GGUF's generation_config values
    assert f"PARAMETER temperature {coding.temperature}" in lines and f"PARAMETER top_p {coding.top_p}" in lines
    assert 'LICENSE """apache-2.0\nhttps://example.org/LICENSE"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in lines


def test_legacy_modelfile_template_renders_like_transformers(release, tmp_path, go_render, tokenizer):
    text = modelfile_text(release, tmp_path / "Modelfile", legacy_template=True)
    commands = [line.split(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert "RENDERER" not in commands and "PARSER" not in commands and "TEMPLATE" in commands
    # Ollama's parser takes everything between the triple quotes verbatim
    body = text.split('TEMPLATE """', 1)[1].split('"""\n', 1)[0]
    assert body == QWEN35_GO_TEMPLATE and '"""' not in body
    case = CONVERSATIONS["tools-system-parallel-calls"]
    (go,) = render_go(go_render, body, [case])
    assert_same_text(go, render_jinja(tokenizer, qwen35_template(), case))


def test_legacy_template_refused_without_the_qwen35_chat_template(tmp_path):
    (path,) = write_gguf(tmp_path / "plain.gguf", chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(PublishError, match=r"plain\.gguf: tokenizer\.chat_template is not the Qwen3\.5 template"):
        modelfile_text(path, None, legacy_template=True)
    (bare,) = write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(PublishError, match=r"bare\.gguf: tokenizer\.chat_template is missing"):
        modelfile_text(bare, None, legacy_template=True)


def test_num_ctx_beyond_the_context_length_is_refused(tmp_path):
    (path,) = write_gguf(tmp_path / "m.gguf", chat_template=qwen35_template(), context_length=4096)
    with pytest.raises(PublishError, match="--num-ctx 8192: larger than the model's context length 4096"):
        modelfile_text(path, None, num_ctx=8192)


def test_cli_writes_the_modelfile_and_reports_errors_in_one_line(tmp_path, capsys):
    files = write_gguf(tmp_path / "m.gguf", chat_template=qwen35_template(), license="mit")
    out = tmp_path / "sub" / "Modelfile"
    main(["modelfile", str(files[0]), "-o", str(out), "--license-file", str(GO_SOURCE)])
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text()
    assert f"FROM {files[0].resolve()}" in text  # the GGUF is not under the Modelfile's folder
    assert 'LICENSE """// render executes' in text
    with pytest.raises(SystemExit) as exit_info:
        main(["modelfile", str(tmp_path / "missing-00002-of-00003.gguf")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing-00001-of-00003.gguf: first shard" in err and err.count("\n") == 1
