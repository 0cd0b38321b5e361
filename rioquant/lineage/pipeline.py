"""`rioquant lineage`: open → plan → stream pieces → sums → verdicts → report, top to bottom.

Each piece (a run of rows of one tensor or expert slab, from every source at once) is reduced to
per-block sums and exact-match counts and then dropped, so memory holds a few pieces whatever the
model's size. A unit's verdict is given when its last piece is in; an expert stack's when its last
expert's is.
"""

import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType

from rioquant.files.gguf_file import block_index, nbytes, tensor_kind
from rioquant.lineage.sources import Source, Unit, open_sources, plan_units, stream
from rioquant.lineage.stats import Candidate, Moments, UnitReducer
from rioquant.lineage.verdict import judge, merge_exact, overall
from rioquant.progress import progress_bar
from rioquant.source import HUB_ID, HubOptions

log = logging.getLogger(__name__)
REPORT_FORMAT = "rioquant-lineage/1"
KNOWN_RECIPES = 2  # the most frequent and the most recent recipes found so far: every later unit tests them
HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)")


@dataclass(frozen=True)
class LineageOptions:
    parent_repos: tuple[str, ...] = ()  # Hub ids of the parents, in --parent order (for the model card)
    progress: bool = True
    threads: int | None = None  # pieces read and reduced at once (default: the cores this process may use)
    hub: HubOptions = HubOptions()  # ORG/REPO models: their cache folders and the disk their shards share


def hub_id(given: str) -> str | None:
    """The Hub repository a path names: 'org/name' as given (of 'org/name@revision' too), or a Hub cache
    folder models--org--name."""
    repo = HUB_ID.match(given)
    if repo and not Path(given).is_absolute():
        return repo["repo"]
    match = HUB_CACHE.search(given)
    return f"{match[1]}/{match[2]}" if match else None


def _seed(unit: Unit) -> int:
    return zlib.crc32(f"{unit.name}:{unit.expert}".encode())


class _Tensor:
    """What is gathered for one tensor while its units stream past."""

    def __init__(self) -> None:
        self.pieces: dict[int | None, list[UnitReducer]] = {}
        self.experts: list[dict] = []


def analyse(child: str, parents: list[str], options: LineageOptions = LineageOptions()) -> dict:
    """Compare CHILD with its supposed parents; the report as a JSON-ready dict (see rioquant.lineage)."""
    started = time.perf_counter()
    child_source, parent_sources = open_sources(child, parents, options.hub)
    sources = [child_source, *parent_sources]
    letters = [chr(ord("A") + i) for i in range(len(parents))]
    units = plan_units(sources)
    tensors: list[dict] = []
    totals: dict[str, Moments] = {}
    gathering: dict[str, _Tensor] = {}
    read = 0
    known: dict[str, tuple[int, int, Candidate]] = {}  # recipe → (units it reproduced, last unit, recipe)
    judged = 0
    total_bytes = sum(_unit_bytes(s, u) for s in sources for u in units)
    bar = progress_bar(options.progress, total=total_bytes, unit="B", unit_scale=True, desc="lineage")
    def prepare(unit: Unit, index: int):
        """The work for one piece, with the recipes known when it is handed out (taken here, in order)."""
        storage = [s.tensors[unit.name].storage for s in sources]
        reducer = UnitReducer(len(parents), unit.elements, letters, storage, _known_recipes(known))

        def work(values: list) -> UnitReducer:
            reducer.add(values[0], tuple(values[1:]))
            return reducer
        return work

    threads = options.threads or len(os.sched_getaffinity(0))
    for unit, index, reducer, piece_bytes in stream(units, sources, prepare, threads):
        state = gathering.setdefault(unit.name, _Tensor())
        done = state.pieces.setdefault(unit.expert, [])
        done.append(reducer)
        read += piece_bytes
        bar.update(piece_bytes)
        if index < len(unit.pieces) - 1:
            continue
        moments = Moments.concat([r.moments for r in done])
        exact = merge_exact([r.exact() for r in done])
        record = judge(moments, exact, letters, _seed(unit))
        judged += 1
        for candidate in {c.label: c for r in done for c in r.candidates or []}.values():
            if candidate.label in record.get("reproduced_by", ()):
                count = known.get(candidate.label, (0, 0, candidate))[0]
                known[candidate.label] = (count + 1, judged, candidate)
        experts = sources[0].tensors[unit.name].experts
        if unit.expert is not None:
            state.experts.append({"expert": unit.expert, **record})
            if unit.expert < experts - 1:
                continue
            slabs = list(state.pieces.values())
            stack = Moments.concat([r.moments for pieces in slabs for r in pieces])
            record = judge(stack, merge_exact([r.exact() for pieces in slabs for r in pieces]), letters, _seed(unit))
            record["experts"] = state.experts
            totals[unit.name] = stack.total()
        else:
            totals[unit.name] = moments.total()
        tensors.append({"name": unit.name, **_where(unit.name), **record})
        del gathering[unit.name]
    bar.close()
    for source in sources:
        source.finish()
    seconds = time.perf_counter() - started
    model = overall(tensors, totals, letters)
    repos = list(options.parent_repos) + [hub_id(p) for p in parents[len(options.parent_repos):]]
    weights = (model.get("fit") or {}).get("weights") or {}
    intervals = (model.get("fit") or {}).get("interval") or {}
    return {
        "format": REPORT_FORMAT,
        "child": child,
        "parents": [{"letter": letter, "given": given, "repo": repo, "path": str(s.path), "kind": s.kind}
                    for letter, given, repo, s in zip(letters, parents, repos, parent_sources, strict=True)],
        "verdict": model["verdict"],
        "coefficients": {given: weights.get(letter) for letter, given in zip(letters, parents, strict=True)},
        "intervals": {given: intervals.get(letter) for letter, given in zip(letters, parents, strict=True)},
        **{k: v for k, v in model.items() if k != "verdict"},
        "bytes_read": read,
        "seconds": round(seconds, 3),
        "tensors": tensors,
    }


def _known_recipes(known: dict[str, tuple[int, int, Candidate]]) -> tuple[Candidate, ...]:
    """The recipes a new unit tests besides its own: the model's usual one(s) and the latest (a merge
    whose weights change with the layer reproduces the previous layer's neighbour most often)."""
    frequent = sorted(known.values(), key=lambda e: -e[0])[:KNOWN_RECIPES]
    recent = sorted(known.values(), key=lambda e: -e[1])[:KNOWN_RECIPES]
    return tuple({e[2].label: e[2] for e in (*frequent, *recent)}.values())


def _unit_bytes(source: Source, unit: Unit) -> int:
    """Bytes a unit occupies in a source, for the progress bar (its storage is a GGML type's name)."""
    return nbytes(GGMLQuantizationType[source.tensors[unit.name].storage], (unit.elements,))


def _where(name: str) -> dict:
    """Layer and kind of a GGUF tensor name, for the figures: blk.3.ffn_up_exps.weight → 3, ffn_up_exps."""
    return {"layer": block_index(name), "kind": tensor_kind(name)}
