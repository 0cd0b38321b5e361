"""The option groups the `rioquant` commands share, declared once (as huggingface_hub's CLI does),
and the small conversions from their values to the packages' option objects."""

import re
from pathlib import Path

import click

from rioquant.export.qwen35moe_vision import MMPROJ_TYPES

SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'50G' and '50GB' → 50_000_000_000 (decimal units, as llama.cpp's gguf-split and --split-max-size
    use); '64GiB' → 64 × 2³⁰ (binary units only when spelled with i)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT]?)B?|([KMGT])IB)\s*", text.upper())
    if not match:
        raise click.BadParameter(f"{text!r}: expected a size like 50G, 96GB, 64GiB, 500M or 2000000000")
    number, decimal, binary = match.groups()
    scale = 1024 ** (" KMGT".index(binary)) if binary else SIZE_UNITS[decimal or ""]
    return int(float(number) * scale)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        return value if isinstance(value, int) else parse_size(value)


def options(*decorators):
    """One decorator from many click options, so a group of options is declared once and shared."""
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


MIX_HELP = ("Q8_0 (default), Q6_K, Q5_K_M, Q5_K_S, Q4_K_M, Q4_K_S, Q3_K_L, Q3_K_M, Q3_K_S, Q2_K, "
            "Q5_1, Q5_0, Q4_1, Q4_0, IQ4_XS, IQ4_NL, IQ3_M, IQ3_S, IQ3_XS, IQ3_XXS, IQ2_M, IQ2_S, "
            "IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S (llama.cpp's mixes), Q4_K_XL, Q3_K_XL, Q2_K_XL (rioquant's), "
            "or uniform F32, F16, BF16, Q5_K, Q4_K, Q3_K.")

# The options that decide every tensor's type besides the mix, shared by `convert` and `plan`.
_type_rule_options = (
    click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
                 help="Type of the tensors whose name matches REGEX (repeatable; first match wins)."),
    click.option("--output-tensor-type", default=None, metavar="TYPE", help="Type of output.weight."),
    click.option("--token-embedding-type", default=None, metavar="TYPE", help="Type of token_embd.weight."),
    click.option("--recipe", type=click.Path(path_type=Path), default=None, metavar="FILE.toml",
                 help="A recipe of your own (TOML rules, see docs/recipes.md) instead of --type."),
    click.option("--target-size", type=SizeType(), default=None,
                 help="Raise the worst-measured tensors until the output is this big (e.g. 230G)."),
    click.option("--target-bpw", type=float, default=None,
                 help="Raise the worst-measured tensors up to this many bits per weight."),
    click.option("--imatrix", "imatrix", type=click.Path(path_type=Path), default=None,
                 help="llama.cpp importance matrix (GGUF from llama-imatrix or `rioquant imatrix`, or legacy "
                      ".dat). IQ1_*, IQ2_*, IQ3_XXS and IQ3_XS need one; IQ4_*, Q4_0 and Q5_0 choose some "
                      "types by whether one is given (all `plan` looks at)."),
)

# `plan` plans one mix; `convert` writes several from one read of the checkpoint (-o is then a folder).
recipe_options = options(click.option("--type", "qtype", default=None, metavar="MIX", help=MIX_HELP),
                         *_type_rule_options)
convert_recipe_options = options(
    click.option("--type", "qtype", multiple=True, metavar="MIX",
                 help=MIX_HELP + " Repeat it (or give A,B,...) for several outputs from one read of SRC: "
                                 "-o is then a folder, and each output is SRC's name plus -MIX.gguf."),
    *_type_rule_options,
)

# What goes into the file besides the types (which tensors, how split, the metadata), shared by
# `convert` and `plan`: the metadata changes the header's size, so `plan` takes it too.
output_options = options(
    click.option("--no-mtp", is_flag=True, help="Drop the multi-token-prediction (NextN) layer."),
    click.option("--split-max-size", type=SizeType(), default=0, help="Split into shards of at most this size (e.g. 50G)."),
    click.option("--split-max-tensors", type=int, default=0, help="Split into shards of at most N tensors."),
    click.option("--base-model", "base_models", multiple=True, metavar="ORG/REPO",
                 help="A model this one derives from (repeat for each parent of a merge)."),
    click.option("--name", default=None, help="general.name (default: from the model card or directory)."),
    click.option("--quantized-by", default=None, help="general.quantized_by."),
    click.option("--pre-tokenizer", default=None, metavar="NAME",
                 help="llama.cpp's pre-tokenizer name (e.g. qwen35) for a vocabulary its hash table does not know; "
                      "taken on your word, with a warning and a note in the file's metadata."),
)

# The vision projector beside the model, shared by `convert` and `plan`: `--mmproj` alone means F16
mmproj_option = click.option(
    "--mmproj", "mmproj", type=click.Choice(MMPROJ_TYPES, case_sensitive=False), is_flag=False, flag_value="F16",
    default=None, help="Also write the vision projector mmproj-TYPE.gguf beside the model (--mmproj alone: F16), "
                       "for llama.cpp's --mmproj and Ollama.")

# Where an ORG/REPO source is streamed through, shared by `convert` and `plan`.
hub_options = options(
    click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                 help="Folder an ORG/REPO source's files are downloaded to (default: $HF_HOME/rioquant/ORG/REPO)."),
    click.option("--cache-max", type=SizeType(), default="120G", show_default=True,
                 help="Most disk an ORG/REPO source's shards may use at once; each is deleted once converted."),
)


def hub_settings(cache_dir, cache_max):
    from rioquant.source import HubOptions

    return HubOptions(cache_dir=cache_dir, cache_max=cache_max)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")

# How llama.cpp will run the model, shared by `fit` and `plan` (rioquant.quant.memory.RunSettings).
run_options = options(
    click.option("--ctx", type=int, default=4096, show_default=True,
                 help="Context in tokens, all sequences together (llama.cpp's -c)."),
    click.option("--cache-type", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True,
                 help="KV cache type (llama.cpp's -ctk/-ctv)."),
    click.option("--parallel", type=int, default=1, show_default=True, help="Sequences decoded at once (-np)."),
    click.option("--kv-unified", is_flag=True, help="One KV cache shared by all sequences (llama.cpp's -kvu)."),
)


def run_settings(ctx, cache_type, parallel, kv_unified):
    from rioquant.quant.memory import RunSettings

    return RunSettings(ctx=ctx, cache_type=cache_type, parallel=parallel, kv_unified=kv_unified)
no_progress_option = click.option("--no-progress", is_flag=True, help="No progress bar.")

# `--ray` alone joins the cluster `ray start` runs on this machine ("auto"); rioquant.cluster reads the rest.
ray_option = click.option(
    "--ray", "ray", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
    help="Run on a Ray cluster (ray://HOST:10001, HOST:6379; alone: the local `ray start` cluster; local: start "
         "one here). Every node must read the model's path. Needs rioquant[ray].")


def convert_options(qtype, tensor_types, output_tensor_type, token_embedding_type, recipe, target_size, target_bpw,
                     imatrix, no_mtp, split_max_size, split_max_tensors, base_models, name, quantized_by,
                     pre_tokenizer):
    """ConvertOptions from recipe_options' and output_options' values (one mix)."""
    from rioquant.convert import ConvertOptions, MetadataOptions, SplitOptions
    from rioquant.errors import PlanError

    if recipe is not None and qtype is not None:
        raise PlanError('--recipe and --type: give one (a recipe extends a mix with base = "Q4_K_M")')
    return ConvertOptions(
        qtype=qtype or "Q8_0", recipe=recipe, tensor_types=tuple(tensor_types), output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type, target_size=target_size, target_bpw=target_bpw,
        imatrix=imatrix, with_mtp=not no_mtp, split=SplitOptions(split_max_size, split_max_tensors),
        metadata=MetadataOptions(tuple(base_models), name, quantized_by, pre_tokenizer),
    )


# Shared by `ppl`, `kld` and `imatrix`: text, context, and where and how the model runs.
eval_options = options(
    click.option("--text", type=click.Path(path_type=Path), required=True, help="UTF-8 evaluation text."),
    click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk (llama.cpp's -c)."),
    click.option("--chunks", type=int, default=None, help="Use at most N chunks (default: all)."),
    click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N)."),
    click.option("--threads", type=int, default=None, help="CPU threads (default: torch's)."),
    click.option("--numerics", type=click.Choice(["auto", "exact", "ggml"]), default="auto", show_default=True,
                 help="ggml: round activations as llama.cpp's CPU backend does (auto: for a GGUF); "
                      "exact: float32 on the dequantized weights."),
    click.option("--max-memory", type=SizeType(), default=0,
                 help="Host memory for activations and one layer (e.g. 200G); activations beyond it go to --tmp-dir."),
    click.option("--tmp-dir", type=click.Path(path_type=Path), default=None, help="Where spilled activations go."),
    click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
                 help="tokenizer.json to use instead of the model's own."),
    click.option("--group-chunks", type=int, default=None,
                 help="Chunks run as one batch (default: as many as memory allows; with --ray, an even split over "
                      "the nodes). The figures depend on the batch only in float rounding; give the same N to "
                      "compare a cluster's run with one machine's to the last digit."),
    ray_option,
    click.option("--profile", "profile_out", type=click.Path(path_type=Path), default=None,
                 help="Write per-layer time and memory as JSON here."),
    json_option,
    no_progress_option,
)


def engine_options(device, threads, numerics, max_memory, tmp_dir, group_chunks, ray, no_progress):
    """EngineOptions from eval_options' values (the ones about where and how the model runs)."""
    from rioquant.evaluate.engine import EngineOptions

    return EngineOptions(device=device, threads=threads, numerics=numerics, max_memory=max_memory, tmp_dir=tmp_dir,
                         group_chunks=group_chunks, ray=ray, progress=not no_progress)
