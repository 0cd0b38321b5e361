"""ORG/REPO[@REVISION] as a source: the checkpoint streamed from the Hugging Face Hub through a cache
folder that never holds more than `--cache-max` bytes.

Config, tokenizer, model card and index come first (small); each shard's header is read with two HTTP
range requests, so the whole plan is known before any weight is downloaded. Then, in plan order, a
tensor's shards are downloaded (huggingface_hub's `hf_hub_download` into the cache folder: it resumes a
partial file) when the tensor is about to be written, checked against the size and sha256 the Hub lists
(a mismatch is deleted and fetched again, never converted), and deleted once the last tensor that needs
them is written. Which shards are on disk together is decided by the plan alone, so the high-water mark
is checked before anything is downloaded. Only files the repository lists are fetched, and only under
names that stay inside the cache folder.

Why not `snapshot_download`: it fetches everything at once (807 GB for the 397B); why not reading
tensors over HTTP ranges: a shard is read several times (experts, scales), and a local file makes
`--resume` and the byte-exact readers the same as for a local checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rioquant.errors import CheckpointError
from rioquant.export.checkpoint import checkpoint_files, read_config, read_header, with_block_scales
from rioquant.export.qwen35moe import model_args, tensor_specs
from rioquant.export.tensor_map import TensorSpec
from rioquant.files.disk import is_confined_name
from rioquant.source import HubOptions, Source, checkpoint_source

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
# What a conversion reads besides the weights: config, tokenizer (gguf-py's SpecialVocab reads the
# others), the model card (general.* metadata) and the shard index.
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "README.md", INDEX)
VERIFY_ATTEMPTS = 2  # a shard that fails its check twice in a row is an error, not a retry loop


def _hub_call(what: str, call, *args, **kwargs):
    """A huggingface_hub call with its errors as one line."""
    try:
        return call(*args, **kwargs)
    except LocalEntryNotFoundError:  # what hf_hub_download raises when the Hub cannot be reached
        raise CheckpointError(f"{what}: the Hub cannot be reached ({constants.ENDPOINT})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: revision {kwargs.get('revision')!r} does not exist") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: no such repository (or it is private: set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{what}: file not found on the Hub") from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"{what}: {str(err).splitlines()[0]}") from None


class HubSource(Source):
    """A checkpoint whose shards live on the Hub until `holding` needs them."""

    streams = True  # one tensor's shards on disk at a time: the high-water mark --cache-max is checked for
    cluster_readable = False  # its shards come and go on this machine only

    def attach(self, repo: str, commit: str, folder: Path, listed: dict, cache_max: int) -> None:
        self.repo, self.commit, self.folder, self.listed, self.cache_max = repo, commit, folder, listed, cache_max
        self.users: dict[str, int] = {}  # shard → tensors still to write that read it
        for spec in self.specs:
            for shard in _shards_of(spec, self.folder):
                self.users[shard] = self.users.get(shard, 0) + 1
        self.verified: set[str] = set()
        self.high_water = 0  # the most bytes the cache folder held at once (measured)

    @contextmanager
    def holding(self, spec: TensorSpec) -> Iterator[None]:
        shards = sorted(_shards_of(spec, self.folder))
        for shard in shards:
            self._fetch(shard)
        yield
        for shard in shards:
            self.users[shard] -= 1
            if self.users[shard] == 0:
                self._delete(shard)

    def finish(self) -> None:
        """Shards left by a resumed run (their tensors were written before the kill) go too."""
        for shard in list(self.verified):
            self._delete(shard)
        log.info("%s: the cache held at most %.2f GB", self.repo, self.high_water / 1e9)

    def _fetch(self, shard: str) -> None:
        if shard in self.verified:
            return
        path = self.folder / shard
        for _ in range(VERIFY_ATTEMPTS):
            _hub_call(f"{self.repo}/{shard}", hf_hub_download, self.repo, shard, revision=self.commit,
                      local_dir=self.folder)
            self.high_water = max(self.high_water, _folder_bytes(self.folder))
            problem = _mismatch(path, self.listed[shard])
            if problem is None:
                self.verified.add(shard)
                return
            log.warning("%s/%s: %s; fetching it again", self.repo, shard, problem)
            self._delete(shard)
        raise CheckpointError(f"{self.repo}/{shard}: {problem} after {VERIFY_ATTEMPTS} downloads; refusing to convert it")

    def _delete(self, shard: str) -> None:
        (self.folder / shard).unlink(missing_ok=True)
        for meta in (self.folder / ".cache" / "huggingface" / "download").glob(f"{shard}.*"):
            meta.unlink(missing_ok=True)  # huggingface_hub's record of the file: it would trust a new one
        self.verified.discard(shard)


def _shards_of(spec: TensorSpec, folder: Path) -> set[str]:
    """The shard files (names in the repo) a tensor reads: its pieces and an FP8 weight's scales."""
    files = {p.source.file for p in spec.pieces} | {p.source.scale.tensor.file for p in spec.pieces if p.source.scale}
    return {f.relative_to(folder).as_posix() for f in files}


def _mismatch(path: Path, sibling) -> str | None:
    """Why a downloaded file is not the one the Hub lists (size, then sha256), or None."""
    size = path.stat().st_size if path.is_file() else -1
    expected = sibling.lfs.size if sibling.lfs else sibling.size
    if expected is not None and size != expected:
        return f"{size} bytes, the Hub lists {expected}"
    if sibling.lfs is not None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(1 << 24):
                digest.update(piece)
        if digest.hexdigest() != sibling.lfs.sha256:
            return "sha256 differs from the Hub's"
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _range_reader(repo: str, shard: str, commit: str):
    """fetch(start, length) of a file on the Hub, through huggingface_hub's HTTP session and headers."""
    url = hf_hub_url(repo, shard, revision=commit)
    headers = huggingface_hub.utils.build_hf_headers()

    def fetch(start: int, length: int) -> bytes:
        def get():
            response = huggingface_hub.get_session().get(
                url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"}, follow_redirects=True)
            huggingface_hub.utils.hf_raise_for_status(response)
            return response.content

        return _hub_call(f"{repo}/{shard}", get)

    return fetch


def cache_folder(repo: str, cache_dir: Path | None) -> Path:
    """Where the repo's files go: CACHE_DIR/ORG/REPO (default $HF_HOME/rioquant/ORG/REPO), so the folder is
    named as `hf download ORG/REPO --local-dir REPO` names it (general.name is read from it)."""
    if not is_confined_name(repo):
        raise CheckpointError(f"{repo}: not a repository name")
    return (cache_dir or Path(constants.HF_HOME) / "rioquant") / repo


def hub_source(repo: str, revision: str | None, with_mtp: bool, weights_optional: bool, options: HubOptions) -> Source:
    """The Hub repository as a source; `weights_optional` (the `plan` command) downloads the small files only."""
    folder = cache_folder(repo, options.cache_dir)
    info = _hub_call(repo, HfApi().model_info, repo, revision=revision, files_metadata=True)
    listed = {s.rfilename: s for s in info.siblings or [] if is_confined_name(s.rfilename)}
    folder.mkdir(parents=True, exist_ok=True)
    small = [name for name in SMALL_FILES if name in listed and not (weights_optional and name == INDEX)]
    if "config.json" not in small:
        raise CheckpointError(f"{repo}@{info.sha}: no config.json (is it a Hugging Face checkpoint?)")
    for name in small:
        _hub_call(f"{repo}/{name}", hf_hub_download, repo, name, revision=info.sha, local_dir=folder)
    identity = f"{repo}@{info.sha}"
    if weights_optional:
        source = checkpoint_source(folder, with_mtp, weights_optional=True)
        source.identity = identity
        return source
    shards = _shard_names(repo, folder, listed)
    config = read_config(folder)
    tensors = {}
    for shard in shards:
        tensors |= read_header(folder / shard, _range_reader(repo, shard, info.sha), listed[shard].size)
    tensors = with_block_scales(tensors, config, folder / "config.json")
    args = model_args(config, str(folder / "config.json"))
    source = HubSource(folder, config, args, tensor_specs(tensors, args, with_mtp), identity=identity)
    source.attach(repo, info.sha, folder, listed, options.cache_max)
    _check_cache_limit(source, _folder_bytes(folder), options.cache_max)
    return source


def _shard_names(repo: str, folder: Path, listed: dict) -> list[str]:
    """The weight files, from the index (each a file the repo lists, under a confined name) or the single file."""
    if (folder / INDEX).is_file():
        names = sorted({p.relative_to(folder).as_posix() for p in checkpoint_files(folder)})  # the index's names, confined
    else:
        names = ["model.safetensors"]
    missing = next((n for n in names if n not in listed), None)
    if missing is not None:
        raise CheckpointError(f"{repo}: {missing} is not a file the repository lists")
    return names


def _check_cache_limit(source: HubSource, small_bytes: int, cache_max: int) -> None:
    """Before any download: the largest set of shards the plan holds at once must fit in --cache-max."""
    if not cache_max:
        return
    size = {name: source.listed[name].size for name in source.users}
    biggest = max(size, key=size.get)
    if small_bytes + size[biggest] > cache_max:
        raise CheckpointError(f"--cache-max {cache_max / 1e9:.2f} GB: shard {biggest} alone is {size[biggest] / 1e9:.2f} GB "
                              f"(beside {small_bytes / 1e9:.2f} GB of config and tokenizer)")
    first, last = {}, {}
    for i, spec in enumerate(source.specs):
        for shard in _shards_of(spec, source.folder):
            first.setdefault(shard, i)
            last[shard] = i
    peak, at = 0, 0
    for i in range(len(source.specs)):
        live = sum(size[s] for s in size if first[s] <= i <= last[s])
        if live > peak:
            peak, at = live, i
    if small_bytes + peak > cache_max:
        raise CheckpointError(f"--cache-max {cache_max / 1e9:.2f} GB: writing {source.specs[at].name} needs "
                              f"{(small_bytes + peak) / 1e9:.2f} GB of shards on disk at once; raise --cache-max")
    source.planned_peak = small_bytes + peak
    log.info("%s: at most %.2f GB of shards on disk at once", source.repo, source.planned_peak / 1e9)
