"""`rioquant publish`: verify → describe → write → upload, top to bottom.

Nothing is uploaded until every GGUF in the folder has passed verify.py. The release is planned in
full first (files, sizes, sha256, generated texts); the same plan is the dry run and the upload.
Uploaded: every quant (file or split set) with its companions `NAME.*` (error report, figures,
`NAME.eval.json`), imatrix files, vision projectors (`mmproj-*.gguf`), and four generated files: README.md (card.py), `template` and
`params` (what the Hub's Ollama integration reads), SHA256SUMS. Other files in the folder stay local.
"""

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rioquant.errors import PublishError
from rioquant.export.qwen35moe import ARCH
from rioquant.export.qwen35moe_vision import ARCH as PROJECTOR_ARCH
from rioquant.files.disk import write_atomic
from rioquant.files.gguf_set import GGUFSet
from rioquant.publish.card import GENERATED_MARK, describe, render_card
from rioquant.publish.gotemplate import QWEN35_GO_TEMPLATE, looks_like_qwen35
from rioquant.publish.modelfile import ollama_params
from rioquant.publish.upload import hub_url, upload_release
from rioquant.publish.verify import HASH_CACHE, find_sets, sha256_files

log = logging.getLogger(__name__)

README = "README.md"
SUMS = "SHA256SUMS"


@dataclass(frozen=True)
class PublishOptions:
    dry_run: bool = False
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None
    base_models: tuple[str, ...] = ()  # the model quantized (first) and any parents the GGUF lacks
    force: bool = False  # overwrite a README.md that rioquant did not write
    progress: bool = True
    endpoint: str | None = None  # default: HF_ENDPOINT or huggingface.co
    # from a `rioquant lineage -o` report (lineage.report.card_lineage): a merge's parents for base_model,
    # and the Markdown section with the verdict
    merge_parents: tuple[str, ...] = ()
    lineage_lines: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    repo_id: str
    folder: Path
    files: dict[str, tuple[int, str]]  # existing files to upload: repo path → (size, sha256)
    generated: dict[str, str]  # repo path → text written before the upload
    skipped: list[str] = field(default_factory=list)
    commit_message: str = ""

    @property
    def paths(self) -> list[str]:
        return sorted({*self.files, *self.generated})


def _sha256_text(text: str) -> tuple[int, str]:
    data = text.encode("utf-8")
    return len(data), hashlib.sha256(data).hexdigest()


def _companions(folder: Path, sets: list[GGUFSet]) -> list[Path]:
    """`NAME.*` beside each set (reports, figures, eval) and the imatrix files the quants name."""
    out = []
    for qset in sets:
        parent = qset.files[0].parent
        out += [p for p in sorted(parent.iterdir())
                if p.is_file() and p.name.startswith(qset.stem + ".") and p.suffix != ".gguf"]
        imatrix = qset.meta.get("quantize.imatrix.file")
        if isinstance(imatrix, str) and (folder / Path(imatrix).name).is_file():
            out.append(folder / Path(imatrix).name)
    return list(dict.fromkeys(out))


def plan_release(repo_id: str, folder: Path, options: PublishOptions) -> Release:
    """Verify every GGUF, hash every file and write the generated texts (in memory)."""
    sets = find_sets(folder)
    quants = [s for s in sets if not s.is_imatrix and not s.is_projector]
    projectors = [s for s in sets if s.is_projector]
    if not quants:
        raise PublishError(f"{folder}: no model GGUF to publish (only imatrix or projector files)")
    for q in quants:
        arch = q.meta.get("general.architecture")
        if arch != ARCH:
            raise PublishError(f"{q.files[0]}: architecture {arch!r}; rioquant publishes {ARCH} quants only")
    for p in projectors:
        arch = p.meta.get("general.architecture")
        if arch != PROJECTOR_ARCH:
            raise PublishError(f"{p.files[0]}: a projector of architecture {arch!r}; expected {PROJECTOR_ARCH}")
    readme = folder / README
    if readme.is_file() and GENERATED_MARK not in readme.read_text(errors="replace") and not options.force:
        raise PublishError(f"{readme}: exists and was not written by rioquant; move it away or pass --force")
    uploads = [p for s in sets for p in s.files] + _companions(folder, sets)
    uploads = [p for p in dict.fromkeys(uploads) if p.name not in (README, SUMS)]
    hashes = sha256_files(folder, uploads, options.progress)
    files = {p.relative_to(folder).as_posix(): (p.stat().st_size, hashes[p]) for p in uploads}

    header = quants[0].first
    params = ollama_params(header)
    generated = {"params": json.dumps(params, indent=2, ensure_ascii=False) + "\n"}
    chat_template = header.metadata.get("tokenizer.chat_template")
    if looks_like_qwen35(chat_template if isinstance(chat_template, str) else None):
        generated["template"] = QWEN35_GO_TEMPLATE + "\n"
    else:
        log.warning("%s: the chat template is not Qwen3.5's; no Ollama `template` file is written",
                    quants[0].files[0])
    listed = {**files, **{path: _sha256_text(text) for path, text in generated.items()}}
    generated[SUMS] = "".join(f"{digest}  {path}\n" for path, (_, digest) in sorted(listed.items()))
    cards = [describe(q) for q in quants]
    generated[README] = render_card(repo_id, cards, listed, params, options.base_models, "template" in generated,
                                    options.merge_parents, options.lineage_lines,
                                    [p.files[0].relative_to(folder).as_posix() for p in projectors])

    taken = {*files, *generated, HASH_CACHE}
    skipped = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.relative_to(folder).as_posix() not in taken
                     and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    message = options.commit_message or (
        f"Upload {', '.join(c.label for c in cards)} GGUF" + ("s" if len(cards) > 1 else "") + " (rioquant)")
    return Release(repo_id, folder, files, generated, skipped, message)


def render_release(release: Release, options: PublishOptions) -> str:
    """The dry run: the repository, the commit, every file with size and sha256, the generated texts."""
    visibility = "private" if options.private else "default visibility"
    total = sum(size for size, _ in release.files.values())
    lines = [
        f"repository: {hub_url(release.repo_id, options.endpoint)} (model; created {visibility} if missing)",
        f"revision:   {options.revision or 'main'}" + (" (branch created if missing)" if options.revision else ""),
        f"commit:     {release.commit_message}",
        f"files:      {len(release.paths)} ({total / 1e9:.2f} GB of GGUFs and companions)",
    ]
    width = max(len(p) for p in release.paths)
    for path in release.paths:
        if path in release.generated:
            size, digest = _sha256_text(release.generated[path])
            lines.append(f"  {path:<{width}}  {size:>14,} B  generated  sha256 {digest}")
        else:
            size, digest = release.files[path]
            lines.append(f"  {path:<{width}}  {size:>14,} B  {'':9}  sha256 {digest}")
    if release.skipped:
        lines.append(f"not uploaded: {', '.join(release.skipped)}")
    for path in sorted(release.generated):
        lines += ["", f"----- {path} -----", release.generated[path].rstrip("\n")]
    return "\n".join(lines) + "\n"


def publish(repo_id: str, folder: Path, options: PublishOptions) -> str:
    """Plan the release, then print it (dry run) or write the generated files and upload everything."""
    release = plan_release(repo_id, folder, options)
    if options.dry_run:
        return render_release(release, options)
    for path, text in release.generated.items():
        write_atomic(folder / path, text)
    url = upload_release(repo_id, folder, release.paths, private=options.private, revision=options.revision,
                         commit_message=release.commit_message, endpoint=options.endpoint)
    return f"uploaded {len(release.paths)} files to {hub_url(repo_id, options.endpoint)}: {url}\n"
