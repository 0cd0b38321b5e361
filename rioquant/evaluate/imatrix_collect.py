"""Collect Σx² per weight input during the streaming pass and write llama.cpp's GGUF imatrix format.

What llama-imatrix collects (tools/imatrix/imatrix.cpp): for every matrix multiplication by a weight
in a block (`blk.*`; `output.weight` only with --process-output), the sum of squares of each input
column over all tokens of all chunks, with a count of the tokens; for the 3-D expert tensors one sum
and one count per expert, counting each routed (token, slot) pair. The file holds, per weight,
`<name>.in_sum2` F32 [n_per_row, n_mat] and `<name>.counts` F32 [1, n_mat], and the keys
`general.type = imatrix`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`.
Sums are accumulated in float64 (llama.cpp: float32) and written as float32.
"""

from pathlib import Path

import gguf
import numpy as np
import torch

from rioquant.evaluate.forward import Observer
from rioquant.export.qwen35moe import ModelArgs
from rioquant.files.disk import replacing


class ImatrixCollector:
    """Accumulates per-tensor Σx² and counts on the evaluation device; `layer(il)` gives its Observer."""

    def __init__(self, args: ModelArgs, device: torch.device) -> None:
        self.args, self.device = args, device
        self.sums: dict[str, torch.Tensor] = {}  # name → float64 (n_mat, n_per_row)
        self.counts: dict[str, np.ndarray] = {}  # name → int64 (n_mat,)

    def _entry(self, name: str, n_mat: int, n_per_row: int) -> torch.Tensor:
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, n_per_row, dtype=torch.float64, device=self.device)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        return self.sums[name]

    def add(self, name: str, x: torch.Tensor, mat: int = 0, n_mat: int = 1) -> None:
        """Rows x (n, n_per_row) multiplied by matrix `mat` of weight `name`."""
        sums = self._entry(name, n_mat, x.shape[-1])
        sums[mat] += x.double().pow(2).sum(dim=0)
        self.counts[name][mat] += x.shape[0]

    def partial(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The sums (float64) and counts so far as arrays: what a cluster task sends back for its chunks."""
        return {name: s.cpu().numpy() for name, s in self.sums.items()}, dict(self.counts)

    def merge(self, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> None:
        """Add the partial of the next group of chunks. Merged in group order from an empty collector, this
        is the local run's float64 arithmetic: it too adds one sum per weight per group, group after group."""
        for name, s in sums.items():
            self._entry(name, *s.shape).add_(torch.tensor(s, device=self.device))
            self.counts[name] += counts[name]

    def layer(self, il: int) -> Observer:
        collector, n_experts = self, self.args.num_experts

        class _LayerObserver:
            def dense(self, kind: str, x: torch.Tensor) -> None:
                collector.add(f"blk.{il}.{kind}.weight", x)

            def expert(self, kind: str, e: int, x: torch.Tensor) -> None:
                collector.add(f"blk.{il}.{kind}.weight", x, e, n_experts)

        return _LayerObserver()

    def experts_without_data(self) -> dict[str, list[int]]:
        return {name: [int(e) for e in np.flatnonzero(c == 0)] for name, c in self.counts.items()
                if len(c) > 1 and np.any(c == 0)}

    def write(self, path: Path, datasets: list[str], chunk_count: int, chunk_size: int) -> int:
        """Write the GGUF imatrix (under a temporary name, renamed when complete); returns the entry count."""
        path = Path(path)
        with replacing(path) as tmp:
            writer = gguf.GGUFWriter(tmp, arch="imatrix")
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, datasets)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
            names = sorted(n for n in self.sums if np.any(self.counts[n] > 0))  # llama-imatrix skips entries with no data
            for name in names:
                writer.add_tensor(f"{name}.in_sum2", self.sums[name].float().cpu().numpy())  # (n_mat, n_per_row)
                writer.add_tensor(f"{name}.counts", self.counts[name].astype(np.float32).reshape(-1, 1))  # (n_mat, 1)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return len(names)
