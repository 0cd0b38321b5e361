"""The three evaluations, each reading as its data flow: tokenize → stream the layers → score the head.

- `perplexity`: llama-perplexity's method: non-overlapping chunks of ctx tokens, the second half of
  each scored (positions ctx/2 … ctx−2 predict the next token), PPL = exp(mean NLL).
- `kl_divergence`: the base runs once; per scored token its output-normed hidden state is stored
  (hidden × 4 bytes, 16 KB for the 397B model, instead of llama.cpp's 0.5 MB of 16-bit log-probs);
  during the quant's head stage the base logits are recomputed from those states with the base's own
  output matrix, so every statistic is computed on the full vocabulary, exactly (float32 logits).
- `collect_imatrix`: Σx² and counts per weight input in the same streaming pass (no head needed).

Each evaluation's work on its chunks is one function (`perplexity_terms`, `kld_per_token`, `imatrix_terms`)
returning what is merged (per-token values, partial sums) and the profiles; run once here, or once per
group of chunks on a Ray cluster (`EngineOptions.ray`, evaluate.distributed), merged in chunk order.
"""

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rioquant.errors import EvaluationError
from rioquant.evaluate.distributed import group_label, map_groups
from rioquant.evaluate.engine import (
    Activations,
    Engine,
    EngineOptions,
    Profile,
    cpu_threads,
    numerics_for,
    resolve_numerics,
)
from rioquant.evaluate.head import OutputHead, kld_terms
from rioquant.evaluate.imatrix_collect import ImatrixCollector
from rioquant.evaluate.source import HeadWeights, ModelSource, open_source
from rioquant.evaluate.stats import kld_summary, perplexity_summary
from rioquant.evaluate.text import tokenize_text
from rioquant.files.disk import replacing

log = logging.getLogger(__name__)

DEFAULT_OPTIONS = EngineOptions()


def _scored(engine: Engine, acts: Activations, head: HeadWeights):
    """(chunk slice, states (rows, H), targets (rows,)) of the scored positions, group by group."""
    ctx = engine.chunks.shape[1]
    first = ctx // 2
    for g, states in engine.final_states(acts, head.output_norm):
        targets = torch.from_numpy(engine.chunks[g, first + 1 :].astype(np.int64)).reshape(-1).to(engine.device)
        yield g, states[:, first : ctx - 1].reshape(-1, states.shape[-1]), targets


def _write_profile(path: Path | None, profiles: dict[str, Profile]) -> None:
    if path is None:
        return
    data = {}
    for name, p in profiles.items():
        data[name] = {**asdict(p), "tokens_per_s": p.tokens / p.wall_s if p.wall_s else None}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _per_group(fn: Callable, tokens: np.ndarray, options: EngineOptions, *args: Any) -> tuple[list, dict[str, Profile]]:
    """fn(*args, tokens, options)'s results: one call here, or one per group of chunks on the cluster, in
    chunk order; with the profiles of every call."""
    if not options.ray:
        result, profiles = fn(*args, tokens, options)
        return [result], profiles
    results, profiles = [], {}
    for group, (result, group_profiles) in map_groups(fn, tokens, options, *args):
        results.append(result)
        profiles.update({group_label(name, group): p for name, p in group_profiles.items()})
    return results, profiles


def _for_groups(path: Path, source: ModelSource, options: EngineOptions) -> Path | ModelSource:
    """What a per-group function is handed: the source opened here (reading a GGUF's header, 1.6 s with the
    248K-token vocabulary, happens once), or its path for a cluster task (each node opens it)."""
    return Path(path) if options.ray else source


def _opened(model: Path | ModelSource) -> ModelSource:
    return model if isinstance(model, ModelSource) else open_source(model)


def perplexity(model: Path, text: Path, ctx: int = 512, chunks: int | None = None,
               options: EngineOptions = DEFAULT_OPTIONS, tokenizer: Path | None = None,
               profile_out: Path | None = None) -> dict:
    """llama-perplexity on `model` (HF checkpoint or GGUF): {"ppl", "ppl_stderr", "tokens_scored", "chunks", "ctx"}."""
    source = open_source(model)
    tokens = tokenize_text(source, text, ctx, chunks, tokenizer)
    parts, profiles = _per_group(perplexity_terms, tokens, options, _for_groups(model, source, options))
    nll = np.concatenate(parts)
    _write_profile(profile_out, profiles)
    return {**perplexity_summary(nll), "tokens_scored": len(nll), "chunks": tokens.shape[0], "ctx": ctx}


def perplexity_terms(model: Path | ModelSource, tokens: np.ndarray,
                     options: EngineOptions) -> tuple[np.ndarray, dict[str, Profile]]:
    """NLL of every scored token of `tokens`' chunks, in chunk order."""
    engine = Engine(_opened(model), tokens, options)
    with cpu_threads(options.threads):
        acts = engine.run_layers()
        try:
            nll = _perplexity_head(engine, acts)
        finally:
            acts.close()
    return nll, {"model": engine.profile}


def _perplexity_head(engine: Engine, acts: Activations) -> np.ndarray:
    t0 = time.perf_counter()
    head = engine.source.head(engine.device)
    t1 = time.perf_counter()
    output = OutputHead(head.output, engine.layer_numerics(None))
    out = []
    with torch.inference_mode():
        for _, h, targets in _scored(engine, acts, head):
            out.append(output.scores(h, targets).nll.cpu().numpy())
    t2 = time.perf_counter()
    engine.head_profile(head.output.nbytes, t1 - t0, t2 - t1)
    engine.profile.wall_s += t2 - t0
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# KL divergence


def _states_key(base: ModelSource, tokens: np.ndarray, options: EngineOptions) -> dict:
    return {
        "base": str(base.path.resolve()),
        "numerics": resolve_numerics(options.numerics, base),
        "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
        "chunks": int(tokens.shape[0]),
        "ctx": int(tokens.shape[1]),
        "hidden": base.args.hidden_size,
    }


def _base_states(base: ModelSource, tokens: np.ndarray, options: EngineOptions, path: Path,
                 profiles: dict[str, Profile]) -> np.ndarray:
    """float32 (n_chunks, scored positions, H): the base's output-normed states, read back from `path` when
    its sidecar says it holds this very run (same base, tokens, ctx), else computed and written there."""
    key = _states_key(base, tokens, options)
    sidecar = path.with_name(path.name + ".json")
    if path.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == key:
        log.info("reusing base states from %s", path)
        return np.load(path, mmap_mode="r")
    ctx = tokens.shape[1]
    n_scored = ctx - 1 - ctx // 2
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(base, tokens, options)
    acts = engine.run_layers()
    try:
        t0 = time.perf_counter()
        head = base.head(engine.device)
        states = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                           shape=(tokens.shape[0], n_scored, base.args.hidden_size))
        for g, h, _ in _scored(engine, acts, head):
            states[g] = h.reshape(-1, n_scored, h.shape[-1]).cpu().numpy()
        states.flush()
        engine.profile.wall_s += time.perf_counter() - t0
    finally:
        acts.close()
    sidecar.write_text(json.dumps(key, indent=2) + "\n")
    profiles["base"] = engine.profile
    return np.load(path, mmap_mode="r")


def kl_divergence(base: Path, quant: Path, text: Path, ctx: int = 512, chunks: int | None = None,
                  options: EngineOptions = DEFAULT_OPTIONS, tokenizer: Path | None = None,
                  base_states: Path | None = None, profile_out: Path | None = None,
                  tokens_out: Path | None = None) -> dict:
    """KL divergence and token statistics of `quant` against `base`, as `llama-perplexity --kl-divergence`.

    `tokens_out` keeps every scored token's KLD (float64 .npy, in text order): the tail statistics
    (99.9 %) of several texts or runs are only exact from the tokens themselves."""
    if base is None or not Path(base).exists():
        raise EvaluationError(f"--base {base}: no such model (a checkpoint directory or a GGUF)")
    base_src, quant_src = open_source(base), open_source(quant)
    if (base_src.n_vocab, base_src.args.hidden_size) != (quant_src.n_vocab, quant_src.args.hidden_size):
        raise EvaluationError(
            f"{quant}: vocabulary × hidden {quant_src.n_vocab} × {quant_src.args.hidden_size} differs from the base's "
            f"{base_src.n_vocab} × {base_src.args.hidden_size}: not a quant of that model"
        )
    tokens = tokenize_text(base_src, text, ctx, chunks, tokenizer)
    parts, profiles = _per_group(kld_per_token, tokens, options, _for_groups(base, base_src, options),
                                 _for_groups(quant, quant_src, options), base_states, bool(options.ray))
    per_token = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    _write_profile(profile_out, profiles)
    if tokens_out is not None:
        with replacing(Path(tokens_out)) as tmp, open(tmp, "wb") as f:
            np.save(f, per_token["kld"])
    return {**kld_summary(**per_token), "chunks": tokens.shape[0], "ctx": ctx, "base": str(base), "quant": str(quant),
            "text": str(text)}


def kld_per_token(base: Path | ModelSource, quant: Path | ModelSource, base_states: Path | None, per_group: bool,
                  tokens: np.ndarray, options: EngineOptions) -> tuple[dict[str, np.ndarray], dict[str, Profile]]:
    """Per scored token of `tokens`' chunks: KLD, Δp, both NLLs, same top token.

    With `per_group` (a cluster task) the base states go to their own file beside `base_states`, named by
    the chunks' hash, so the next quant reuses them whichever node runs the group.
    """
    base_src, quant_src = _opened(base), _opened(quant)
    if base_states is not None and per_group:
        digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
        base_states = Path(base_states).with_name(f"{Path(base_states).stem}.{digest}{Path(base_states).suffix}")
    profiles: dict[str, Profile] = {}
    with cpu_threads(options.threads), tempfile.TemporaryDirectory(dir=options.tmp_dir) as tmp:
        states = _base_states(base_src, tokens, options, Path(base_states or Path(tmp) / "base-states.npy"), profiles)
        engine = Engine(quant_src, tokens, options)
        acts = engine.run_layers()
        try:
            per_token = _kld_head(engine, acts, base_src, states)
        finally:
            acts.close()
        del states
    profiles["quant"] = engine.profile
    return per_token, profiles


def _kld_head(engine: Engine, acts: Activations, base: ModelSource, states: np.ndarray) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    head_q = engine.source.head(engine.device)
    base_out = base.head(engine.device).output
    t1 = time.perf_counter()
    quant_head = OutputHead(head_q.output, engine.layer_numerics(None))
    base_head = OutputHead(base_out, numerics_for(base, resolve_numerics(engine.options.numerics, base), None))
    parts: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for g, h, targets in _scored(engine, acts, head_q):
            hb = torch.from_numpy(np.array(states[g])).reshape(h.shape).to(engine.device)
            for key, v in kld_terms(base_head, hb, quant_head, h, targets).items():
                parts.setdefault(key, []).append(v.cpu().numpy())
    t2 = time.perf_counter()
    engine.head_profile(head_q.output.nbytes + base_out.nbytes, t1 - t0, t2 - t1)
    engine.profile.wall_s += t2 - t0
    return {key: np.concatenate(v) for key, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# importance matrix


def collect_imatrix(src: Path, text: Path, out: Path, ctx: int = 512, chunks: int | None = None,
                    options: EngineOptions = DEFAULT_OPTIONS, tokenizer: Path | None = None,
                    process_output: bool = False, profile_out: Path | None = None) -> dict:
    """Write llama.cpp's GGUF imatrix for `src` over the chunks of `text` (every position of every chunk)."""
    source = open_source(src)
    tokens = tokenize_text(source, text, ctx, chunks, tokenizer)
    parts, profiles = _per_group(imatrix_terms, tokens, options, _for_groups(src, source, options), process_output)
    collector = ImatrixCollector(source.args, torch.device("cpu"))
    for sums, counts in parts:
        collector.merge(sums, counts)
    n_entries = collector.write(out, [str(text)], tokens.shape[0], ctx)
    _write_profile(profile_out, profiles)
    return {
        "output": str(out), "entries": n_entries, "chunks": int(tokens.shape[0]), "ctx": ctx,
        "tokens": int(tokens.size), "experts_without_data": collector.experts_without_data(),
    }




def imatrix_terms(src: Path | ModelSource, process_output: bool, tokens: np.ndarray,
                  options: EngineOptions) -> tuple[tuple[dict, dict], dict[str, Profile]]:
    """Σx² (float64) and counts per weight input over `tokens`' chunks (ImatrixCollector.partial)."""
    source = _opened(src)
    engine = Engine(source, tokens, options)
    collector = ImatrixCollector(source.args, engine.device)
    with cpu_threads(options.threads):
        acts = engine.run_layers(collector.layer)
        try:
            if process_output:
                head = source.head(engine.device)
                with torch.inference_mode():
                    for _, states in engine.final_states(acts, head.output_norm):
                        collector.add("output.weight", states.reshape(-1, states.shape[-1]))
        finally:
            acts.close()
    return collector.partial(), {"model": engine.profile}


def chunk_logits(model: Path, chunks: np.ndarray, options: EngineOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """Full logits float32 (n_chunks, ctx, n_vocab) of already tokenized chunks: for checks on small models."""
    source = open_source(model)
    engine = Engine(source, np.asarray(chunks, dtype=np.int32), options)
    out = np.empty((*chunks.shape, source.n_vocab), dtype=np.float32)
    with cpu_threads(options.threads):
        acts = engine.run_layers()
        try:
            head = source.head(engine.device)
            output = OutputHead(head.output, engine.layer_numerics(None))
            with torch.inference_mode():
                for g, states in engine.final_states(acts, head.output_norm):
                    out[g] = output.logits(states).cpu().numpy()
        finally:
            acts.close()
    return out
