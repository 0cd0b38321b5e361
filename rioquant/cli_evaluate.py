"""`rioquant ppl`, `kld` and `imatrix`: the commands that run the model (rioquant.evaluate), apart from
cli.py so each file stays one screen of commands; cli.py adds them to the `rioquant` group."""

import json
from pathlib import Path

import click

from rioquant.cli_options import engine_options, eval_options


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@eval_options
def ppl(model, text, ctx, chunks, tokenizer, profile_out, as_json, **engine) -> None:
    """Perplexity of MODEL (checkpoint directory or GGUF) on --text, by llama-perplexity's method.

    \b
    Examples:
      rioquant ppl rio-Q4_K_M.gguf --text wiki.test.raw --json
      rioquant ppl ./Rio-3.5-Open-397B --text wiki.test.raw --device cuda --max-memory 200G
    """
    from rioquant import render
    from rioquant.evaluate.pipelines import perplexity

    result = perplexity(model, text, ctx, chunks, engine_options(**engine), tokenizer, profile_out)
    click.echo(json.dumps(result, indent=2) if as_json else render.perplexity(result))


@click.command()
@click.option("--base", type=click.Path(path_type=Path), required=True,
              help="The reference: checkpoint directory (BF16) or GGUF.")
@click.option("--quant", type=click.Path(path_type=Path), required=True, help="The GGUF to measure.")
@click.option("--base-states", type=click.Path(path_type=Path), default=None,
              help="Keep the base run's stored states here (.npy) and reuse them on the next quant.")
@click.option("--tokens-out", type=click.Path(path_type=Path), default=None,
              help="Write every scored token's KLD here (.npy, text order), for plots or merging runs.")
@eval_options
def kld(base, quant, base_states, tokens_out, text, ctx, chunks, tokenizer, profile_out, as_json, **engine) -> None:
    """KL divergence of --quant from --base, and llama-perplexity's other --kl-divergence statistics.

    \b
    Examples:
      rioquant kld --base ./Rio-3.5-Open-397B --quant rio-Q4_K_M.gguf --text wiki.test.raw --json
      rioquant kld --base rio-BF16.gguf --quant rio-Q3_K_M.gguf --text wiki.test.raw --base-states base.npy
    """
    from rioquant import render
    from rioquant.evaluate.pipelines import kl_divergence

    result = kl_divergence(base, quant, text, ctx, chunks, engine_options(**engine), tokenizer, base_states, profile_out,
                           tokens_out)
    click.echo(json.dumps(result, indent=2) if as_json else render.kl_divergence(result))


@click.command("imatrix")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--outfile", "out", type=click.Path(path_type=Path), required=True, help="Output imatrix .gguf.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (llama-imatrix --process-output).")
@eval_options
def imatrix_command(src, out, process_output, text, ctx, chunks, tokenizer, profile_out, as_json, **engine) -> None:
    """Importance matrix of SRC over --text, in llama.cpp's GGUF imatrix format.

    \b
    Examples:
      rioquant imatrix ./Rio-3.5-Open-397B --text calibration.txt -o imatrix.gguf --device cuda
      rioquant convert ./Rio-3.5-Open-397B -o rio-Q4_K_M.gguf --type Q4_K_M --imatrix imatrix.gguf
    """
    from rioquant import render
    from rioquant.evaluate.pipelines import collect_imatrix

    result = collect_imatrix(src, text, out, ctx, chunks, engine_options(**engine), tokenizer, process_output,
                             profile_out)
    click.echo(json.dumps(result, indent=2) if as_json else render.imatrix_collected(result))
