"""The `rioquant` command line: parse options, call the packages, print one-line errors.

Every user-caused failure is a RioquantError and is printed as `error: <message>` with exit code 1;
set RIOQUANT_DEBUG=1 to see the traceback instead.
"""

import json
import logging
import os
import re
import sys
from pathlib import Path

import click

from rioquant.errors import RioquantError

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'50G' → 50_000_000_000 (decimal units, as llama.cpp's gguf-split and --split-max-size use)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not match:
        raise click.BadParameter(f"{text!r}: expected a size like 50G, 500M or 2000000000")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
def cli(verbose: bool) -> None:
    """rioquant: stream a Qwen3.5-MoE checkpoint into GGUF quants that are bit-exact with ggml."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--outfile", "out", type=click.Path(path_type=Path), required=True, help="Output .gguf path.")
@click.option("--type", "qtype", default="Q8_0", show_default=True,
              help="F32, F16, BF16, Q8_0, Q6_K, Q5_K, Q4_K, Q3_K or Q2_K.")
@click.option("--no-mtp", is_flag=True, help="Drop the multi-token-prediction (NextN) layer.")
@click.option("--split-max-size", type=SizeType(), default=0, help="Split into shards of at most this size (e.g. 50G).")
@click.option("--split-max-tensors", type=int, default=0, help="Split into shards of at most N tensors.")
@click.option("--base-model", "base_models", multiple=True, metavar="ORG/REPO",
              help="A model this one derives from (repeat for each parent of a merge).")
@click.option("--name", default=None, help="general.name (default: from the model card or directory).")
@click.option("--quantized-by", default=None, help="general.quantized_by.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion of the same plan.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--threads", type=int, default=None, help="Quantization threads (default: all cores).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def convert(src, out, qtype, no_mtp, split_max_size, split_max_tensors, base_models, name, quantized_by,
            resume, force, threads, no_progress) -> None:
    """Convert the Hugging Face checkpoint SRC into a GGUF.

    \b
    Examples:
      rioquant convert ./Rio-3.5-Open-397B -o rio-Q4_K.gguf --type Q4_K --split-max-size 50G
      rioquant convert ./ckpt -o out.gguf --type BF16 --base-model Qwen/Qwen3.5-397B-A17B
    """
    from rioquant.convert import ConvertOptions
    from rioquant.convert import convert as run_convert

    options = ConvertOptions(
        qtype=qtype, with_mtp=not no_mtp, split_max_size=split_max_size, split_max_tensors=split_max_tensors,
        base_models=tuple(base_models), name=name, quantized_by=quantized_by, resume=resume, force=force,
        threads=threads, progress=not no_progress,
    )
    for path in run_convert(src, out, options):
        click.echo(str(path))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(file, as_json) -> None:
    """Print a GGUF's metadata and its size by type and by tensor kind."""
    from rioquant.export.inspect import inspect_gguf, render_text

    report = inspect_gguf(file)
    click.echo(json.dumps(report, indent=2) if as_json else render_text(report))


def main(argv: list[str] | None = None) -> None:
    """Entry point; `argv` lets tests run the real error handling in-process."""
    try:
        cli.main(args=argv, prog_name="rioquant", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except RioquantError as err:
        if os.environ.get("RIOQUANT_DEBUG"):
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
