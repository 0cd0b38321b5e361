"""README's table: for Rio 3.5 Open 397B, the best mix per memory budget and context, by `rioquant fit`.

    python -m bench.fit_table [CONFIG.json] [--cache-type q8_0]

Plans every mix from config.json alone (with the real Qwen3.5 tokenizer), then ranks them at each
budget (GB = 10^9 bytes) and context (llama.cpp's -c, one sequence) exactly as `rioquant fit` does.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from rioquant.fit import model_mixes, rank
from rioquant.quant.memory import RunSettings
from rioquant.testing.tokenizer import tokenizer_files

CONFIG_397B = Path(__file__).parent.parent / "tests" / "data" / "rio-3.5-open-397b" / "config.json"
BUDGETS_GB = (64, 96, 128, 192, 256)
CONTEXTS = (8192, 32768, 131072, 262144)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=CONFIG_397B)
    parser.add_argument("--cache-type", default="f16", choices=("f16", "q8_0"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "Rio-3.5-Open-397B"
        src.mkdir()
        shutil.copyfile(options.config, src / "config.json")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(tokenizer_files() / name, src / name)
        shape, sizes, _ = model_mixes(src)
    print("| memory | " + " | ".join(f"-c {c // 1024}K" for c in CONTEXTS) + " |")
    print("|---" * (len(CONTEXTS) + 1) + "|")
    for gb in BUDGETS_GB:
        cells = []
        for ctx in CONTEXTS:
            fits = rank(shape, sizes, gb * 10**9, RunSettings(ctx=ctx, cache_type=options.cache_type))["fits"]
            cells.append(f"{fits[0]['mix']} ({fits[0]['file_bytes'] / 1e9:.1f} GB, needs {fits[0]['memory_bytes'] / 1e9:.1f})"
                         if fits else "none")
        print(f"| {gb} GB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
