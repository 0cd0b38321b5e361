"""`rioquant modelfile`: an Ollama Modelfile for a qwen35moe GGUF, from the GGUF's own metadata.

Everything comes from the header of the file (the first shard of a split set): the chat template
(`tokenizer.chat_template`), the end tokens (`tokenizer.ggml.eos/eot/eom_token_id`), the sampling
values convert copied from generation_config.json (`general.sampling.*`), the context length and the
licence (`general.license*`). Ollama >= 0.30 has Qwen3.5's prompt format built in (`RENDERER` /
`PARSER qwen3.5`); `--legacy-template` writes the Go `TEMPLATE` of rioquant.publish.gotemplate
instead, for older releases. The same parameters are the Hub's `params` file (see card.py).
A vision projector beside the model (`mmproj-F16.gguf`, as `convert --mmproj` writes it) is a second
`FROM` after the model's: current Ollama makes a projector layer of a GGUF whose general.type is mmproj.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from rioquant import __version__
from rioquant.errors import PublishError
from rioquant.export.qwen35moe import ARCH
from rioquant.files.disk import write_atomic
from rioquant.files.gguf_file import GGUFHeader, read_header
from rioquant.files.gguf_set import first_shard, set_stem
from rioquant.publish.gotemplate import QWEN35_GO_TEMPLATE, looks_like_qwen35

log = logging.getLogger(__name__)

OLLAMA_RENDERER = "qwen3.5"  # Ollama's built-in renderer and parser names (model/renderers, model/parsers)
OLLAMA_PARSER = "qwen3.5"


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    presence_penalty: float


# Qwen's recommended sampling for Qwen3.5 (model card, "Best Practices"). Qwen3.5 thinks by default.
PRESETS: dict[str, Sampling] = {
    "thinking": Sampling(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),  # general tasks
    "coding": Sampling(temperature=0.6, top_p=0.95, top_k=20, presence_penalty=0.0),  # thinking, precise coding
    "non-thinking": Sampling(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),  # instruct mode
}
PRESET_CHOICES = ("auto", *PRESETS)

# general.sampling.* (written by convert from generation_config.json) → Ollama parameter
GGUF_SAMPLING: tuple[tuple[str, str], ...] = (
    ("general.sampling.temp", "temperature"),
    ("general.sampling.top_p", "top_p"),
    ("general.sampling.top_k", "top_k"),
    ("general.sampling.min_p", "min_p"),
    ("general.sampling.penalty_repeat", "repeat_penalty"),
    ("general.sampling.penalty_last_n", "repeat_last_n"),
)

# Projector files by preference when a folder holds several: F16 is what releases ship and what
# llama.cpp's `-hf` picks, then the other types `convert --mmproj` writes
PROJECTOR_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")

END_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# Texts llama.cpp ends generation on whatever the ids say (llama-vocab.cpp's EOG list), for ChatML vocabularies
CHATML_END_TEXTS = ("<|im_end|>", "<|endoftext|>")


def _tidy(value: object) -> object:
    """float32 metadata (0.949999988) as the decimal it was written from (0.95)."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def end_tokens(header: GGUFHeader) -> list[str]:
    """Stop strings: the texts of the end-of-generation tokens the header names, then the ChatML ends."""
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    assert isinstance(tokens, list)
    stops: list[str] = []
    for key in END_TOKEN_KEYS:
        token_id = header.metadata.get(key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            stops.append(tokens[token_id])
    present = set(tokens)
    stops += [t for t in CHATML_END_TEXTS if t in present]
    return list(dict.fromkeys(stops))


def sampling_params(header: GGUFHeader, preset: str = "auto") -> dict[str, object]:
    """Sampling parameters: a named Qwen preset, or (auto) the GGUF's generation_config values over
    the thinking preset (generation_config.json has no presence_penalty)."""
    if preset not in PRESET_CHOICES:
        raise PublishError(f"--preset {preset}: unknown; choose one of {', '.join(PRESET_CHOICES)}")
    params: dict[str, object] = dict(vars(PRESETS["thinking" if preset == "auto" else preset]))
    if preset == "auto":
        for key, name in GGUF_SAMPLING:
            if key in header.metadata:
                params[name] = _tidy(header.metadata[key])
    return params


def ollama_params(header: GGUFHeader, preset: str = "auto", num_ctx: int | None = None) -> dict[str, object]:
    """Ollama parameters in the order a Modelfile lists them; `stop` is a list (one PARAMETER line each)."""
    params = sampling_params(header, preset)
    if num_ctx is not None:
        limit = header.metadata.get(f"{ARCH}.context_length")
        if num_ctx < 1:
            raise PublishError(f"--num-ctx {num_ctx}: must be a positive number of tokens")
        if isinstance(limit, int) and num_ctx > limit:
            raise PublishError(f"--num-ctx {num_ctx}: larger than the model's context length {limit}")
        params["num_ctx"] = num_ctx
    params["stop"] = end_tokens(header)
    return params


def license_text(header: GGUFHeader, license_file: Path | None = None) -> str | None:
    """The LICENSE body: a file's text, or the licence id, name and link recorded in the GGUF."""
    if license_file is not None:
        try:
            return license_file.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise PublishError(f"--license-file {license_file}: cannot read ({err.strerror})") from None
    parts = [header.metadata.get(k) for k in ("general.license", "general.license.name", "general.license.link")]
    lines = [str(p) for p in parts if p]
    return "\n".join(dict.fromkeys(lines)) or None


def _quote(value: str) -> str:
    """A Modelfile argument. Ollama's parser ends a value at the first newline after which it
    unquotes: triple quotes for text across lines or with quotes, double quotes around blanks."""
    if '"""' in value:
        raise PublishError(f'a Modelfile value cannot contain """ ({value[:40]!r}…)')
    if "\n" in value or '"' in value:
        return f'"""{value}"""'
    if any(c in value for c in " \t"):
        return f'"{value}"'
    return value


def _quote_always(value: str) -> str:
    """Stop strings are quoted, as Ollama's documentation writes them."""
    quoted = _quote(value)
    return quoted if quoted.startswith('"') else f'"{quoted}"'


def _from_path(gguf: Path, modelfile_dir: Path) -> str:
    """FROM path: './name' relative to the Modelfile's folder (Ollama resolves it from there) when the
    GGUF lies under that folder, else absolute."""
    path, base = gguf.resolve(), modelfile_dir.resolve()
    return f"./{path.relative_to(base).as_posix()}" if path.is_relative_to(base) else str(path)


def modelfile_text(
    gguf: Path,
    out: Path | None = None,
    *,
    legacy_template: bool = False,
    preset: str = "auto",
    num_ctx: int | None = None,
    license_file: Path | None = None,
    mmproj: Path | None = None,
    no_mmproj: bool = False,
) -> str:
    """The Modelfile for `gguf` (any shard of a split set), to be written at `out` (None: stdout).

    `mmproj`: the vision projector's FROM (default: `find_projector` beside the model; `no_mmproj`: none).
    """
    first = first_shard(gguf)
    header = read_header(first)
    arch = header.metadata.get("general.architecture")
    if arch != ARCH:
        raise PublishError(f"{first}: architecture {arch!r}; rioquant writes Modelfiles for {ARCH} only")
    chat_template = header.metadata.get("tokenizer.chat_template")
    if not looks_like_qwen35(chat_template if isinstance(chat_template, str) else None):
        message = f"{first}: tokenizer.chat_template is {'missing' if not chat_template else 'not the Qwen3.5 template'}"
        if legacy_template:
            raise PublishError(f"{message}; the Go TEMPLATE is a translation of Qwen3.5's and would not match it")
        log.warning("%s; Ollama's qwen3.5 renderer will format prompts its own way", message)
    params = ollama_params(header, preset, num_ctx)
    name = header.metadata.get("general.name") or first.stem
    lines = [
        f"# Modelfile for {name}, written by rioquant {__version__}",
        f"# ollama create {_model_tag(first)} -f {out.name if out else 'Modelfile'}",
    ]
    lines.append(
        "# TEMPLATE: Qwen3.5's chat template in Go, for Ollama releases without RENDERER qwen3.5 (before 0.30)"
        if legacy_template else
        "# RENDERER/PARSER qwen3.5 need Ollama >= 0.30; for older releases: rioquant modelfile --legacy-template"
    )
    folder = out.parent if out else Path.cwd()
    lines.append(f"FROM {_quote(_from_path(first, folder))}")
    projector = None if no_mmproj else mmproj or find_projector(first.parent)
    if projector is not None:
        kind = read_header(projector).metadata.get("general.type") if projector.is_file() else None
        if kind != "mmproj":
            raise PublishError(f"--mmproj {projector}: not a projector GGUF (general.type {kind!r}, expected 'mmproj')")
        lines.append(f"FROM {_quote(_from_path(projector, folder))}")
    if legacy_template:
        lines.append(f"TEMPLATE {_quote(QWEN35_GO_TEMPLATE)}")
    else:
        lines += [f"RENDERER {OLLAMA_RENDERER}", f"PARSER {OLLAMA_PARSER}"]
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {_quote_always(v) if key == 'stop' else v}")
    text = license_text(header, license_file)
    if text:
        lines.append(f"LICENSE {_quote(text)}")
    else:
        log.warning("%s: no general.license in the GGUF; pass --license-file to add a LICENSE", first)
    return "\n".join(lines) + "\n"


def find_projector(folder: Path) -> Path | None:
    """The vision projector among `folder`'s `mmproj*.gguf` files (general.type mmproj), F16 first."""
    found = [p for p in sorted(folder.glob("mmproj*.gguf"))
             if p.is_file() and read_header(p).metadata.get("general.type") == "mmproj"]

    def rank(path: Path) -> int:
        label = path.stem.upper().removeprefix("MMPROJ-")
        return PROJECTOR_PREFERENCE.index(label) if label in PROJECTOR_PREFERENCE else len(PROJECTOR_PREFERENCE)

    return min(found, key=rank) if found else None


def _model_tag(first: Path) -> str:
    """A model name Ollama accepts, from the file name: lower case, split suffix dropped."""
    return set_stem(first).lower().replace(" ", "-")


def write_modelfile(gguf: Path, out: Path | None, **options) -> str:
    """Write the Modelfile at `out` (temporary name, then rename) and return its text."""
    text = modelfile_text(gguf, out, **options)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text)
    return text
