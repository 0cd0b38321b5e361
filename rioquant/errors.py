"""The one error hierarchy of rioquant.

Every failure a user can cause (bad checkpoint, bad option, bad input array) raises a subclass of
`RioquantError` whose message is one line naming the file, tensor or option and, where there is one,
the fix. The CLI formats these once; anything else is a bug and keeps its traceback.
"""


class RioquantError(Exception):
    """A failure caused by the input or the options, reported to the user as one line."""


class QuantInputError(RioquantError, ValueError):
    """An array handed to a quantizer cannot be quantized as asked (shape, dtype, NaN/Inf, block size)."""


class BadRowError(QuantInputError):
    """A row the quantizer refuses; `row` is its index in the array handed over, so a caller that quantizes
    a matrix in pieces can name the row of the whole matrix (`shifted`)."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row} {reason}")
        self.row = row
        self.reason = reason

    def shifted(self, offset: int) -> "BadRowError":
        """The same error, for the row `offset` rows further on (its index in the whole matrix)."""
        moved = type(self).__new__(type(self))
        BadRowError.__init__(moved, self.row + offset, self.reason)
        return moved


class NonFiniteRowError(BadRowError):
    """A row holds NaN or Inf."""

    def __init__(self, row: int) -> None:
        super().__init__(row, "holds NaN or Inf: refusing to quantize it")


class CheckpointError(RioquantError):
    """A Hugging Face checkpoint is missing, corrupt or contradicts its config."""


class PlanError(RioquantError):
    """A conversion plan cannot be built or honoured (types, recipes, not enough free space, output exists)."""


class OutputError(RioquantError):
    """An output file cannot be written (the disk filled up); the partial output is kept for --resume."""


class ImatrixError(RioquantError):
    """An importance-matrix file is unreadable or does not fit the model being converted."""


class ReportError(RioquantError):
    """A quantization-error report is missing or unreadable."""


class EvaluationError(RioquantError):
    """An evaluation (ppl, kld, imatrix) cannot run as asked: text too short, wrong model, no CUDA device."""


class GGUFError(RioquantError):
    """A GGUF file is unreadable, truncated, or inconsistent with its split set."""


class PublishError(RioquantError):
    """A Modelfile or a Hugging Face release cannot be made as asked (incomplete set, no token, hub error)."""


class LineageError(RioquantError):
    """Models cannot be compared for lineage: different architectures or shapes, a tensor missing in one."""


class ClusterError(RioquantError):
    """`--ray` cannot be honoured: Ray is not installed, or the cluster cannot be reached."""
