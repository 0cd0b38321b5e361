"""llama.cpp's own quantizer, `llama_model_quantize` (llama-cpp-python 0.3.36), as the oracle for recipes.

- `llama_quantize(src, out, ftype, ...)` writes the GGUF llama-quantize would write from `src` (a BF16
  GGUF): the file to compare rioquant's output with, tensor by tensor (rioquant/testing/gguf_scan.py).
- `llama_dry_run(src, ftype, ...)` runs the same function with `dry_run` set: llama.cpp decides every
  tensor's type exactly as when quantizing, quantizes nothing and logs one line per tensor, which is
  parsed here. Seconds instead of a minute, for the decision-only comparisons. Its decisions look only at
  whether an imatrix is given (`imatrix=True` hands over a placeholder), and it reports whether the real
  run would refuse to go on without one.

Both take llama-quantize's overrides (`--tensor-type`, `--output-tensor-type`, `--token-embedding-type`);
`llama_quantize` also takes the importance llama-quantize derives from an imatrix file (name → float32
values, each expert's row after the other: rioquant/testing/imatrix_files.py computes it), passed as llama.cpp's
own `llama_model_imatrix_data` array. Neither imports rioquant.
"""

import contextlib
import ctypes
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type =\s*(\w+),\s+size =\s*[\d.]+ MiB"
    r"(?: ->\s*[\d.]+ MiB \((\w+)\))?"
)


def _imatrix_array(importance: Mapping[str, np.ndarray], keep: list):
    """llama.cpp's `llama_model_imatrix_data[]`, terminated by a null name; `keep` holds the buffers alive."""
    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    for i, (name, values) in enumerate(sorted(importance.items())):
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        keep.append(flat)
        array[i].name = name.encode()
        array[i].data = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = flat.size
    array[len(importance)].name = None
    keep.append(array)
    return array


def _params(ftype: LlamaFileType, tensor_types: Sequence[tuple[str, str]], output_type: str | None,
            token_embd_type: str | None, dry_run: bool, keep: list,
            importance: Mapping[str, np.ndarray] | None = None):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    params.dry_run = dry_run
    if output_type:
        params.output_tensor_type = int(GGMLQuantizationType[output_type])
    if token_embd_type:
        params.token_embedding_type = int(GGMLQuantizationType[token_embd_type])
    if tensor_types:
        array = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types):
            array[i].pattern = pattern.encode()
            array[i].type = int(GGMLQuantizationType[qtype])
        array[len(tensor_types)].pattern = None  # terminator
        keep.append(array)
        params.tt_overrides = ctypes.cast(array, type(params.tt_overrides))
    if importance:
        params.imatrix = ctypes.cast(_imatrix_array(importance, keep), type(params.imatrix))
    return params


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    """Route llama.cpp's log into a list for the duration, then restore llama-cpp-python's handler."""
    import llama_cpp
    import llama_cpp._logger as default_logger

    texts: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        texts.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield texts
    finally:
        llama_cpp.llama_log_set(default_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_quantize(
    src: Path, out: Path, ftype: LlamaFileType, tensor_types: Sequence[tuple[str, str]] = (),
    output_type: str | None = None, token_embd_type: str | None = None,
    importance: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """`llama-quantize [--imatrix] src out FTYPE` with the given overrides; raises with llama.cpp's log on failure."""
    import llama_cpp

    keep: list = []
    params = _params(ftype, tensor_types, output_type, token_embd_type, False, keep, importance)
    with _captured_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"llama_model_quantize {ftype.name} failed ({rc}):\n" + "".join(log)[-3000:])
    return out


class DryRun(dict[str, GGMLQuantizationType]):
    """Tensor name → the type llama_model_quantize chose; `needs_imatrix`: its warning that quantizing for
    real would require an importance matrix (tensor_requires_imatrix held for some tensor)."""

    needs_imatrix: bool = False


def llama_dry_run(
    src: Path, ftype: LlamaFileType, tensor_types: Sequence[tuple[str, str]] = (),
    output_type: str | None = None, token_embd_type: str | None = None, imatrix: bool = False,
) -> DryRun:
    """The type llama_model_quantize gives every tensor of `src`, from its --dry-run log."""
    import llama_cpp

    keep: list = []
    placeholder = {"placeholder.weight": np.ones(1, dtype=np.float32)} if imatrix else None
    params = _params(ftype, tensor_types, output_type, token_embd_type, True, keep, placeholder)
    with _captured_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), b"/dev/null", ctypes.byref(params))
    text = "".join(log)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize --dry-run {ftype.name} failed ({rc}):\n" + text[-3000:])
    decisions = DryRun((m[1], GGMLQuantizationType[(m[3] or m[2]).upper()]) for m in _LINE.finditer(text))
    if not decisions:
        raise RuntimeError(f"no tensor lines in llama_model_quantize's dry-run log:\n{text[-3000:]}")
    decisions.needs_imatrix = "will require an imatrix" in text
    return decisions
