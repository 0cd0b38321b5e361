"""`make demo`: the main job end to end on a tiny built-in checkpoint.

Builds a tiny Qwen3.5-MoE checkpoint (real Qwen3.5 tokenizer, random weights), converts it to Q4_K
with `rioquant convert`, prints `rioquant inspect`'s size table, then loads the GGUF in llama.cpp
(llama-cpp-python) and generates a few tokens. The weights are random, so the text is noise: the point
is that the file llama.cpp runs came out of one streaming pass.
"""

import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.oracles import plain_cpu_buffers


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="rioquant-demo-"))
    src = build_checkpoint(replace(KQUANT, mtp=True, num_experts=8), work / "tiny-qwen35moe")
    out = work / "tiny-qwen35moe-Q4_K.gguf"
    print(f"checkpoint: {src}\n")
    rioquant = [sys.executable, "-m", "rioquant"]
    subprocess.run([*rioquant, "convert", str(src), "-o", str(out), "--type", "Q4_K",
                    "--base-model", "Qwen/Qwen3.5-397B-A17B"], check=True)
    subprocess.run([*rioquant, "inspect", str(out)], check=True)

    from llama_cpp import Llama

    with plain_cpu_buffers():
        llm = Llama(model_path=str(out), n_ctx=128, n_gpu_layers=0, verbose=False)
    prompt = "<|im_start|>user\nWhat is the capital of Brazil?<|im_end|>\n<|im_start|>assistant\n"
    result = llm.create_completion(prompt, max_tokens=12, temperature=0.0)
    print("\nllama.cpp loaded the GGUF and generated (random weights, so noise):")
    print(repr(result["choices"][0]["text"]))
    print(f"\nfiles are in {work}")


if __name__ == "__main__":
    main()
