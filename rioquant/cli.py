"""The `rioquant` command line: parse options, call the packages, render (rioquant.render), print one-line errors.

Every user-caused failure is a RioquantError and is printed as `error: <message>` with exit code 1;
set RIOQUANT_DEBUG=1 to see the traceback instead.
"""

import json
import logging
import os
import sys
from pathlib import Path

import click

from rioquant.cli_evaluate import imatrix_command, kld, ppl
from rioquant.cli_options import (
    SizeType,
    convert_options,
    convert_recipe_options,
    hub_options,
    hub_settings,
    json_option,
    mmproj_option,
    no_progress_option,
    output_options,
    ray_option,
    recipe_options,
    run_options,
    run_settings,
)
from rioquant.errors import PlanError, RioquantError
from rioquant.export.qwen35moe_vision import MMPROJ_TYPES


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log every step.")
def cli(verbose: bool) -> None:
    """rioquant: stream a Qwen3.5-MoE checkpoint into GGUF quants that are bit-exact with ggml.

    \b
    Examples:
      rioquant plan ./Rio-3.5-Open-397B --type Q4_K_M
      rioquant convert ./Rio-3.5-Open-397B -o rio-Q4_K_M.gguf --type Q4_K_M --split-max-size 50G
      rioquant report rio-Q4_K_M.gguf
      rioquant kld --base ./Rio-3.5-Open-397B --quant rio-Q4_K_M.gguf --text wiki.test.raw
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--outfile", "out", type=click.Path(path_type=Path), required=True,
              help="Output .gguf path (a folder when --type names several mixes).")
@convert_recipe_options
@output_options
@mmproj_option
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion of the same plan.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@click.option("--threads", type=int, default=None, help="Quantization threads (default: all cores).")
@no_progress_option
@click.option("--no-report", is_flag=True, help="Skip the per-tensor/per-expert error report (NAME.report.json/.csv).")
@ray_option
@hub_options
def convert(src, out, mmproj, resume, force, threads, no_progress, no_report, ray, cache_dir, cache_max, **values) -> None:
    """Convert SRC into a GGUF (and, with --mmproj, its vision projector): a Hugging Face checkpoint folder
    (BF16, F16, F32 or FP8), a BF16/F16/F32/Q8_0 GGUF (any shard of a split set), or ORG/REPO[@REVISION]
    streamed from the Hub through --cache-dir.

    \b
    Examples:
      rioquant convert ./Rio-3.5-Open-397B -o rio-Q4_K_M.gguf --type Q4_K_M --split-max-size 50G
      rioquant convert ./Rio-3.5-Open-397B -o release/rio-Q4_K_M.gguf --type Q4_K_M --mmproj
      rioquant convert Qwen/Qwen3.5-397B-A17B -o q-Q4_K_M.gguf --type Q4_K_M --cache-max 120G
      rioquant convert Qwen3.5-397B-BF16-00001-of-00017.gguf -o q-Q4_K_M.gguf --type Q4_K_M
      rioquant convert ./ckpt -o out.gguf --type Q4_K_M --tensor-type 'ffn_down_exps=Q5_K' --target-size 250G
      rioquant convert ./ckpt -o out.gguf --type BF16 --base-model Qwen/Qwen3.5-397B-A17B
      rioquant convert ./ckpt -o out-Q4_K.gguf --type Q4_K --imatrix imatrix.gguf
      rioquant convert ./ckpt -o release/ --type Q4_K_XL --type Q3_K_XL --type IQ2_M --imatrix imatrix.gguf
      rioquant convert /shared/Rio-3.5-Open-397B -o rio-Q4_K_M.gguf --type Q4_K_M --ray head:6379
    """
    from rioquant.convert import RunOptions, convert_many
    from rioquant.mmproj import convert_with_mmproj

    run = RunOptions(resume=resume, force=force, threads=threads, progress=not no_progress, report=not no_report, ray=ray,
                     hub=hub_settings(cache_dir, cache_max))
    mixes = [m.strip() for given in values.pop("qtype") for m in given.split(",") if m.strip()] or [None]
    if len(mixes) > 1 and values["recipe"] is not None:
        raise PlanError("--recipe and several --type: a recipe is one mix; convert it on its own")
    outs = [out] if len(mixes) == 1 else [out / f"{src.resolve().name}-{mix.upper()}.gguf" for mix in mixes]
    outputs = [(o, convert_options(qtype=m, **values)) for o, m in zip(outs, mixes, strict=True)]
    written = convert_many(src, outputs, run) if mmproj is None else convert_with_mmproj(src, outputs, mmproj, run)
    for files in written:
        for path in files:
            click.echo(str(path))


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--outfile", "out", type=click.Path(path_type=Path), default=None,
              help="Output path (default: mmproj-TYPE.gguf in the current folder).")
@click.option("--type", "qtype", type=click.Choice(MMPROJ_TYPES, case_sensitive=False), default="F16",
              show_default=True, help="Type of the projector's matrices (llama.cpp's converter's rules for the rest).")
@click.option("--base-model", "base_models", multiple=True, metavar="ORG/REPO",
              help="A model this one derives from (repeat for each parent of a merge).")
@click.option("--name", default=None, help="general.name (default: from the model card or directory).")
@click.option("--resume", is_flag=True, help="Continue an interrupted write of the same plan.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@no_progress_option
@hub_options
def mmproj(src, out, qtype, base_models, name, resume, force, no_progress, cache_dir, cache_max) -> None:
    """Write the vision projector of SRC alone: the mmproj GGUF llama.cpp (--mmproj) and Ollama load.
    SRC is a checkpoint folder or ORG/REPO[@REVISION] (only the shards holding the tower are fetched).

    \b
    Examples:
      rioquant mmproj ./Rio-3.5-Open-397B -o release/mmproj-F16.gguf
      rioquant mmproj ./Rio-3.5-Open-397B -o release/mmproj-Q8_0.gguf --type Q8_0
      rioquant mmproj Qwen/Qwen3.5-397B-A17B -o release/mmproj-F16.gguf --cache-max 20G
    """
    from rioquant.convert import MetadataOptions, RunOptions
    from rioquant.mmproj import build_mmproj_plan, mmproj_filename, write_mmproj

    plan = build_mmproj_plan(src, qtype, MetadataOptions(tuple(base_models), name), hub=hub_settings(cache_dir, cache_max))
    run = RunOptions(resume=resume, force=force, progress=not no_progress)
    click.echo(str(write_mmproj(plan, out or Path(mmproj_filename(plan.qtype)), run)))


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@recipe_options
@output_options
@mmproj_option
@run_options
@json_option
@hub_options
def plan(src, as_json, mmproj, ctx, cache_type, parallel, kv_unified, cache_dir, cache_max, **values) -> None:
    """Print what `convert` would write, writing nothing: each tensor's type, the rule that chose it, its
    bytes, and the exact file size; then the memory llama.cpp needs to run it at --ctx (as `fit`).
    SRC may hold only config.json and the tokenizer files (no weights); from ORG/REPO only those are downloaded.

    \b
    Examples:
      rioquant plan ./Rio-3.5-Open-397B --type Q4_K_M
      rioquant plan ./Rio-3.5-Open-397B --type Q4_K_XL --ctx 131072 --cache-type q8_0
      rioquant plan ./Rio-3.5-Open-397B --type Q4_K_XL --split-max-size 50G --json > plan.json
      rioquant plan ./Rio-3.5-Open-397B --type Q4_K_M --mmproj F16
    """
    from rioquant import render
    from rioquant.convert import build_plan, describe_plan
    from rioquant.fit import plan_memory
    from rioquant.mmproj import build_mmproj_plan, describe_mmproj

    options = convert_options(**values)
    built = build_plan(src, options, weights_optional=True, hub=hub_settings(cache_dir, cache_max))
    summary = describe_plan(built)
    if mmproj is not None:
        summary["mmproj"] = describe_mmproj(build_mmproj_plan(built.source.path, mmproj, options.metadata,
                                                              weights_optional=True))
    summary["memory"] = plan_memory(built, run_settings(ctx, cache_type, parallel, kv_unified))
    click.echo(json.dumps(summary, indent=2) if as_json else render.plan_table(summary))


@cli.command("fit")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("memory", type=SizeType())
@run_options
@json_option
def fit_command(src, memory, as_json, **run) -> None:
    """Which mix runs in MEMORY, at what context: for every mix, the memory llama.cpp needs (weights it
    loads, KV cache, Gated DeltaNet state, compute and output buffers); the mixes that fit, best first,
    with their headroom and the largest context each allows.

    SRC is a checkpoint, a directory with only config.json and the tokenizer, or a GGUF. MEMORY is in
    decimal units (128G = 128GB = 128 × 10⁹ bytes) or binary ones spelled with i (64GiB = 64 × 2³⁰).

    \b
    Examples:
      rioquant fit ./Rio-3.5-Open-397B 128G
      rioquant fit ./Rio-3.5-Open-397B 192GB --ctx 131072 --cache-type q8_0
      rioquant fit rio-Q4_K_XL.gguf 256GiB --parallel 4 --json
    """
    from rioquant import render
    from rioquant.fit import fit

    result = fit(src, memory, run_settings(**run))
    click.echo(json.dumps(result, indent=2) if as_json else render.fit_table(result))


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--top", type=int, default=15, show_default=True, help="How many worst tensors and experts to list.")
@click.option("--plots-dir", type=click.Path(path_type=Path), default=None,
              help="Where to draw the PNGs (default: beside the report).")
@click.option("--no-plots", is_flag=True, help="Print the summary only.")
def report(file, top, plots_dir, no_plots) -> None:
    """Summarise a conversion's error report: worst tensors and experts, and PNG figures.

    FILE is NAME.report.json or the GGUF (or any shard) it was written beside.

    \b
    Examples:
      rioquant report rio-Q4_K.gguf
      rioquant report rio-Q4_K.report.json --top 30 --plots-dir figures/
    """
    from rioquant import render
    from rioquant.quant.figures import draw_figures
    from rioquant.quant.report import load_report

    data, json_path = load_report(file)
    click.echo(render.error_report(data, top))
    if not no_plots:
        stem = json_path.name.removesuffix(".json")
        for path in draw_figures(data, plots_dir or json_path.parent, stem):
            click.echo(f"figure: {path}")


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_option
def inspect(file, as_json) -> None:
    """Print a GGUF's metadata and its size by type and by tensor kind.

    \b
    Examples:
      rioquant inspect rio-Q4_K_M.gguf
      rioquant inspect rio-Q4_K_M-00001-of-00005.gguf --json
    """
    from rioquant import render
    from rioquant.export.inspect import inspect_gguf

    report = inspect_gguf(file)
    click.echo(json.dumps(report, indent=2) if as_json else render.gguf_summary(report))


@cli.command()
@click.argument("gguf", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write the Modelfile here (default: print it). FROM is relative to its folder.")
@click.option("--legacy-template", is_flag=True,
              help="A Go TEMPLATE of Qwen3.5's chat template instead of RENDERER/PARSER qwen3.5 (Ollama < 0.30).")
@click.option("--preset", type=click.Choice(["auto", "thinking", "coding", "non-thinking"]), default="auto",
              show_default=True, help="Sampling: auto = the GGUF's generation_config values, else Qwen's preset.")
@click.option("--num-ctx", type=int, default=None, help="PARAMETER num_ctx (context window in tokens).")
@click.option("--license-file", type=click.Path(path_type=Path), default=None,
              help="LICENSE text from this file (default: the licence id and link in the GGUF).")
@click.option("--mmproj", type=click.Path(path_type=Path), default=None,
              help="Vision projector for a second FROM (default: mmproj-F16.gguf or another mmproj*.gguf beside GGUF).")
@click.option("--no-mmproj", is_flag=True, help="Leave the vision projector out (text only).")
def modelfile(gguf, out, legacy_template, preset, num_ctx, license_file, mmproj, no_mmproj) -> None:
    """Write an Ollama Modelfile for GGUF (any shard of a split set; FROM names the first, then the
    vision projector found beside it).

    \b
    Examples:
      rioquant modelfile rio-Q4_K.gguf -o Modelfile && ollama create rio -f Modelfile
      rioquant modelfile rio-Q4_K-00002-of-00005.gguf --num-ctx 32768 --preset coding
      rioquant modelfile rio-Q4_K.gguf --legacy-template -o Modelfile.legacy
      rioquant modelfile rio-Q4_K.gguf --mmproj mmproj-Q8_0.gguf -o Modelfile
    """
    from rioquant.publish.modelfile import write_modelfile

    text = write_modelfile(gguf, out, legacy_template=legacy_template, preset=preset, num_ctx=num_ctx,
                           license_file=license_file, mmproj=mmproj, no_mmproj=no_mmproj)
    click.echo(text if out is None else str(out), nl=out is not None)


@cli.command()
@click.argument("repo_id")
@click.argument("folder", metavar="[DIR]", required=False, type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Verify and print what would be created and uploaded; upload nothing.")
@click.option("--private", is_flag=True, help="Create the repository private (ignored if it exists).")
@click.option("--revision", default=None, help="Branch to commit to (created if missing; default main).")
@click.option("--commit-message", default=None, help="The summary / title / first line of the commit.")
@click.option("--base-model", "base_models", multiple=True, metavar="ORG/REPO",
              help="The model these quants are of, for the card's base_model (repeat to add parents).")
@click.option("--force", is_flag=True, help="Overwrite a README.md in DIR that rioquant did not write.")
@click.option("--no-progress", is_flag=True, help="No progress bar while hashing.")
@click.option("--lineage", "lineage_report", type=click.Path(path_type=Path), default=None, metavar="REPORT.json",
              help="A `rioquant lineage -o` report: its verdict on the card, a blend's parents as base_model (merge).")
def publish(repo_id, folder, dry_run, private, revision, commit_message, base_models, force, no_progress,
            lineage_report) -> None:
    """Verify the GGUF quants in DIR, write their model card, and upload them to REPO_ID.

    DIR (default: ./NAME for REPO_ID ORG/NAME, as `hf upload`) holds one or more quants, a file or a
    split set each, with their NAME.report.json / NAME.eval.json. The token is HF_TOKEN or the one
    saved by `hf auth login`; HF_ENDPOINT points elsewhere. Re-running resumes an interrupted upload.

    \b
    Examples:
      rioquant publish me/Rio-3.5-Open-397B-GGUF ./release --dry-run
      rioquant publish me/Rio-3.5-Open-397B-GGUF ./release --private --base-model rio/Rio-3.5-Open-397B
      rioquant publish me/Rio-3.5-Open-397B-GGUF ./release --lineage rio.lineage.json
    """
    from rioquant.errors import PublishError
    from rioquant.publish.release import PublishOptions
    from rioquant.publish.release import publish as run_publish

    if folder is None:
        folder = Path(repo_id.split("/")[-1])
        if not folder.is_dir():
            raise PublishError(f"{folder}: no DIR given and ./{folder} does not exist; name the folder to upload")
    parents, lines = [], []
    if lineage_report is not None:
        from rioquant.lineage.report import card_lineage, load_json

        parents, lines = card_lineage(load_json(lineage_report), lineage_report)
    options = PublishOptions(dry_run=dry_run, private=private, revision=revision, commit_message=commit_message,
                             base_models=tuple(base_models), force=force, progress=not no_progress,
                             merge_parents=tuple(parents), lineage_lines=tuple(lines))
    click.echo(run_publish(repo_id, folder, options), nl=False)


@cli.command()
@click.argument("child")
@click.option("--parent", "parents", multiple=True, required=True, metavar="MODEL",
              help="A supposed parent: checkpoint directory, F32/F16/BF16/Q8_0 GGUF or ORG/REPO[@REV] "
                   "(repeat; the last is the reference).")
@click.option("--parent-repo", "parent_repos", multiple=True, metavar="ORG/REPO",
              help="Hub id of each --parent, in order, for `publish --lineage` (default: the --parent if it reads ORG/NAME).")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Write the JSON report here, and its PNGs beside it.")
@json_option
@click.option("--top", type=int, default=10, show_default=True, help="How many outliers the summary lists.")
@click.option("--no-plots", is_flag=True, help="With -o: no PNGs.")
@click.option("--threads", type=int, default=None, help="Pieces read and reduced at once (default: all cores).")
@no_progress_option
@hub_options
def lineage(child, parents, parent_repos, out, as_json, top, no_plots, threads, no_progress, cache_dir, cache_max) -> None:
    """Show what CHILD is made of: an exact blend of the --parent models, a blend plus an update, or no blend.
    A model given as ORG/REPO[@REV] is streamed from the Hub; --cache-max bounds all of them together.

    \b
    Examples:
      rioquant lineage ./Rio-3.5-Open --parent ./Nex-N2-Pro --parent ./Qwen3.5-397B-A17B -o rio.lineage.json
      rioquant lineage ./merged --parent ./a --parent ./b --parent-repo org/a --parent-repo org/b --json
      rioquant lineage child-BF16.gguf --parent a-Q8_0.gguf --parent ./b
      rioquant lineage org/merged --parent org/a --parent ./b --cache-max 200G
    """
    from rioquant.errors import LineageError
    from rioquant.lineage.pipeline import LineageOptions, analyse
    from rioquant.lineage.report import draw_figures, render_text, write_json

    if len(parent_repos) > len(parents):
        raise LineageError(f"{len(parent_repos)} --parent-repo for {len(parents)} --parent: give at most one per parent")
    options = LineageOptions(tuple(parent_repos), not no_progress, threads, hub_settings(cache_dir, cache_max))
    report = analyse(child, list(parents), options)
    click.echo(json.dumps(report, indent=1, ensure_ascii=False) if as_json else render_text(report, top), nl=as_json)
    if out is not None:
        write_json(report, out)
        if not no_plots:
            for path in draw_figures(report, out.parent, out.name.removesuffix(".json")):
                click.echo(f"figure: {path}", err=as_json)


for command in (ppl, kld, imatrix_command):
    cli.add_command(command)


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
