"""`rioquant inspect`: what is in a GGUF, from its header alone (see rioquant.files.gguf_file for why not GGUFReader)."""

from collections import defaultdict
from pathlib import Path

from rioquant.files.gguf_file import read_header, tensor_kind

MAX_ARRAY_SHOWN = 8


def _shown(value: object) -> object:
    if isinstance(value, float):
        return float(f"{value:.7g}")  # float32 metadata: show the digits it holds, not its binary tail
    if isinstance(value, list) and len(value) > MAX_ARRAY_SHOWN:
        return {"first": value[:MAX_ARRAY_SHOWN], "length": len(value)}
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"… ({len(value)} chars)"
    return value


def inspect_gguf(path: Path) -> dict:
    header = read_header(path)
    metadata = {name: _shown(value) for name, value in header.metadata.items()}
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0, "params": 0})
    for t in header.tensors:
        for table, key in ((by_type, t.qtype.name), (by_kind, tensor_kind(t.name))):
            table[key]["tensors"] += 1
            table[key]["bytes"] += t.nbytes
            table[key]["params"] += t.n_elements
    total_bytes = sum(v["bytes"] for v in by_type.values())
    total_params = sum(v["params"] for v in by_type.values())
    return {
        "file": str(path),
        "metadata": metadata,
        "tensors": len(header.tensors),
        "bytes": total_bytes,
        "params": total_params,
        "bits_per_weight": 8 * total_bytes / max(total_params, 1),
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]["bytes"])),
    }
