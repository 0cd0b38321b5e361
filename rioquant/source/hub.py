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

The same holding (`HubShards`, one per repository, in the order its consumer reads tensors) serves
`mmproj ORG/REPO` (the shards the index lists tower tensors in: `hub_tower`) and `lineage` (every
shard of each Hub model, in the order lineage walks the child's tensors: `hub_checkpoint`), and
`check_cache_limit` checks what several repositories hold together. With `convert --ray` the nodes fetch
through the same `fetch_verified` into their own caches (`hub_node`).

Why not `snapshot_download`: it fetches everything at once (807 GB for the 397B); why not reading
tensors over HTTP ranges: a shard is read several times (experts, scales), and a local file makes
`--resume` and the byte-exact readers the same as for a local checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from rioquant.export.checkpoint import (
    SourceTensor,
    checkpoint_files,
    read_config,
    read_header,
    with_block_scales,
)
from rioquant.export.qwen35moe import ModelArgs, model_args, tensor_specs
from rioquant.export.qwen35moe_vision import PREPROCESSOR
from rioquant.export.tensor_map import VISION_PREFIXES, TensorSpec
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
        raise CheckpointError(f"{what}: the Hub cannot be reached ({kwargs.get('endpoint') or constants.ENDPOINT})") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: revision {kwargs.get('revision')!r} does not exist") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: no such repository (or it is private: set HF_TOKEN)") from None
    except EntryNotFoundError:
        raise CheckpointError(f"{what}: file not found on the Hub") from None
    except (HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"{what}: {str(err).splitlines()[0]}") from None


class HubShards:
    """The shards of one Hub revision that `specs` read, each on disk only while a tensor reading it is held.

    `specs` is the order the consumer holds its tensors in (a conversion's plan, the projector's table,
    lineage's walk over the child's tensors): a shard is deleted once the last of them is done, so which
    shards share the disk is known from that order before anything is downloaded (`check_cache_limit`).
    """

    def __init__(self, hub: HubRepo, specs: list[TensorSpec]) -> None:
        self.hub, self.specs = hub, specs
        self.users: dict[str, int] = {}  # shard → tensors still to hold that read it
        for spec in specs:
            for shard in _shards_of(spec, hub.folder):
                self.users[shard] = self.users.get(shard, 0) + 1
        self.verified: set[str] = set()
        self.high_water = 0  # the most bytes the cache folder held at once (measured)

    @contextmanager
    def holding(self, spec: TensorSpec) -> Iterator[None]:
        shards = sorted(_shards_of(spec, self.hub.folder))
        for shard in shards:
            self._fetch(shard)
        yield
        for shard in shards:
            self.users[shard] -= 1
            if self.users[shard] == 0:
                self._delete(shard)

    def finish(self) -> None:
        """Shards left by a resumed run (their tensors were written before the kill) go too."""
        for shard in self.users:
            self._delete(shard)
        log.info("%s: the cache held at most %.2f GB", self.hub.repo, self.high_water / 1e9)

    def live_bytes(self) -> list[int]:
        """Bytes of shards on disk while each spec is held: those between their first and last reader."""
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, spec in enumerate(self.specs):
            for shard in _shards_of(spec, self.hub.folder):
                first.setdefault(shard, i)
                last[shard] = i
        return [sum(self.hub.listed[s].size for s in first if first[s] <= i <= last[s]) for i in range(len(self.specs))]

    def _fetch(self, shard: str) -> None:
        if shard in self.verified:
            return
        fetch_verified(self.hub, shard)
        self.high_water = max(self.high_water, _folder_bytes(self.hub.folder))
        self.verified.add(shard)

    def _delete(self, shard: str) -> None:
        _delete_shard(self.hub.folder, shard)
        self.verified.discard(shard)


def fetch_verified(hub: HubRepo, shard: str) -> None:
    """Download `shard` into the repo's folder and check it against the size and sha256 the Hub lists:
    a mismatch is deleted and fetched again (VERIFY_ATTEMPTS in all), never read."""
    path = hub.folder / shard
    for _ in range(VERIFY_ATTEMPTS):
        hub.download(shard)
        problem = _mismatch(path, hub.listed[shard])
        if problem is None:
            return
        log.warning("%s/%s: %s; fetching it again", hub.repo, shard, problem)
        _delete_shard(hub.folder, shard)
    raise CheckpointError(f"{hub.repo}/{shard}: {problem} after {VERIFY_ATTEMPTS} downloads; refusing to convert it")


def _delete_shard(folder: Path, shard: str) -> None:
    (folder / shard).unlink(missing_ok=True)
    for meta in (folder / ".cache" / "huggingface" / "download").glob(f"{shard}.*"):
        meta.unlink(missing_ok=True)  # huggingface_hub's record of the file: it would trust a new one


class HubSource(Source):
    """A checkpoint whose shards live on the Hub until `holding` needs them."""

    streams = True  # one tensor's shards on disk at a time: the high-water mark --cache-max is checked for
    shards: HubShards
    cache_dir: Path | None  # --cache-dir as given (None: each machine's default), for a cluster's nodes

    def holding(self, spec: TensorSpec):
        return self.shards.holding(spec)

    def finish(self) -> None:
        self.shards.finish()

    def on_nodes(self) -> Source:
        from rioquant.source.hub_node import HubNodeSource

        node = HubNodeSource(self.path, self.config, self.args, self.specs, identity=self.identity)
        node.hub, node.cache_dir = self.shards.hub, self.cache_dir
        return node


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


@dataclass(frozen=True)
class HubRepo:
    """One revision of a Hub repository: its commit, the files it lists (confined names), the cache folder,
    and the Hub it was resolved on (a cluster's nodes fetch from that one, whatever their HF_ENDPOINT)."""

    repo: str
    commit: str
    folder: Path
    listed: dict
    endpoint: str

    def download(self, name: str) -> None:
        """`hf_hub_download` into the folder: it resumes a partial file and skips one already complete."""
        _hub_call(f"{self.repo}/{name}", hf_hub_download, self.repo, name, revision=self.commit, local_dir=self.folder,
                  endpoint=self.endpoint)

    def headers(self, shards: list[str]) -> dict[str, SourceTensor]:
        """The shards' tensors, from their headers read by range requests (nothing downloaded)."""
        tensors: dict[str, SourceTensor] = {}
        for shard in shards:
            tensors |= read_header(self.folder / shard, _range_reader(self.repo, shard, self.commit), self.listed[shard].size)
        return tensors


def open_repo(repo: str, revision: str | None, options: HubOptions, small: tuple[str, ...]) -> HubRepo:
    """The repository's listing, and those of the `small` files it has downloaded (config.json required)."""
    folder = cache_folder(repo, options.cache_dir)
    info = _hub_call(repo, HfApi().model_info, repo, revision=revision, files_metadata=True)
    listed = {s.rfilename: s for s in info.siblings or [] if is_confined_name(s.rfilename)}
    if "config.json" not in listed:
        raise CheckpointError(f"{repo}@{info.sha}: no config.json (is it a Hugging Face checkpoint?)")
    folder.mkdir(parents=True, exist_ok=True)
    hub = HubRepo(repo, info.sha, folder, listed, constants.ENDPOINT)
    for name in small:
        if name in listed:
            hub.download(name)
    return hub


def hub_checkpoint(repo: str, revision: str | None, options: HubOptions,
                   small: tuple[str, ...] = SMALL_FILES) -> tuple[HubRepo, dict, ModelArgs, dict[str, SourceTensor]]:
    """A Hub checkpoint as `convert` and `lineage` read it: config, arguments and every shard's tensors."""
    hub = open_repo(repo, revision, options, small)
    config = read_config(hub.folder)
    tensors = with_block_scales(hub.headers(_shard_names(hub)), config, hub.folder / "config.json")
    return hub, config, model_args(config, str(hub.folder / "config.json")), tensors


def hub_source(repo: str, revision: str | None, with_mtp: bool, weights_optional: bool, options: HubOptions) -> Source:
    """The Hub repository as a source; `weights_optional` (the `plan` command) downloads the small files only."""
    if weights_optional:
        hub = open_repo(repo, revision, options, tuple(n for n in SMALL_FILES if n != INDEX))
        source = checkpoint_source(hub.folder, with_mtp, weights_optional=True)
        source.identity = f"{repo}@{hub.commit}"
        return source
    hub, config, args, tensors = hub_checkpoint(repo, revision, options)
    source = HubSource(hub.folder, config, args, tensor_specs(tensors, args, with_mtp), identity=f"{repo}@{hub.commit}")
    source.shards, source.cache_dir = HubShards(hub, source.specs), options.cache_dir
    check_cache_limit([source.shards], options.cache_max)
    return source


def hub_tower(repo: str, revision: str | None, options: HubOptions) -> tuple[HubRepo, dict[str, SourceTensor]]:
    """The vision tower's tensors, from the headers of only the shards the index says hold them (all of
    `model.safetensors` without an index); text tensors in those shards are left out."""
    hub = open_repo(repo, revision, options, (*SMALL_FILES, PREPROCESSOR))
    promised = checkpoint_files(hub.folder) if (hub.folder / INDEX).is_file() else {hub.folder / "model.safetensors": None}
    shards = [p.relative_to(hub.folder).as_posix() for p, names in promised.items()
              if names is None or any(n.startswith(VISION_PREFIXES) for n in names)]
    _check_listed(hub, shards)
    tower = {n: t for n, t in hub.headers(sorted(shards)).items() if n.startswith(VISION_PREFIXES)}
    return hub, with_block_scales(tower, read_config(hub.folder), hub.folder / "config.json")


def _shard_names(hub: HubRepo) -> list[str]:
    """The weight files, from the index (each a file the repo lists, under a confined name) or the single file."""
    if (hub.folder / INDEX).is_file():
        names = sorted({p.relative_to(hub.folder).as_posix() for p in checkpoint_files(hub.folder)})  # confined
    else:
        names = ["model.safetensors"]
    _check_listed(hub, names)
    return names


def _check_listed(hub: HubRepo, names: list[str]) -> None:
    missing = next((n for n in names if n not in hub.listed), None)
    if missing is not None:
        raise CheckpointError(f"{hub.repo}: {missing} is not a file the repository lists")


def check_cache_limit(holders: list[HubShards], cache_max: int) -> None:
    """Before any download: the shards all `holders` keep on disk at once (they hold their i-th tensors
    together, one index at a time), beside their small files, must fit in --cache-max."""
    if not cache_max or not any(h.users for h in holders):
        return
    small = sum(_folder_bytes(h.hub.folder) for h in holders)
    size, biggest = max((h.hub.listed[s].size, f"{h.hub.repo}/{s}") for h in holders for s in h.users)
    if small + size > cache_max:
        raise CheckpointError(f"--cache-max {cache_max / 1e9:.2f} GB: shard {biggest} alone is {size / 1e9:.2f} GB "
                              f"(beside {small / 1e9:.2f} GB of config and tokenizer)")
    live = [sum(step) for step in zip(*(h.live_bytes() for h in holders), strict=True)]
    at = max(range(len(live)), key=live.__getitem__)
    if small + live[at] > cache_max:
        raise CheckpointError(f"--cache-max {cache_max / 1e9:.2f} GB: {holders[0].specs[at].name} needs "
                              f"{(small + live[at]) / 1e9:.2f} GB of shards on disk at once; raise --cache-max")
    log.info("%s: at most %.2f GB of shards on disk at once", ", ".join(h.hub.repo for h in holders),
             (small + live[at]) / 1e9)
