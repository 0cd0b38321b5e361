"""`make demo`: the main job end to end on a tiny built-in checkpoint, text and image.

Builds a tiny Qwen3.5-MoE checkpoint with a vision tower (real Qwen3.5 tokenizer, random weights),
converts it to Q4_K with `rioquant convert --mmproj`, which also writes `mmproj-F16.gguf`, prints
`rioquant inspect`'s size tables, then loads both in llama.cpp (llama-cpp-python and its libmtmd):
generates a few tokens for a text prompt and for an image + text prompt, and compares llama.cpp's image
embeddings with transformers' vision tower on the same pixels. The weights are random, so the text is
noise: the point is that the files llama.cpp runs came out of one rioquant run and the numbers agree.
"""

import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from rioquant.testing.checkpoints import KQUANT, build_checkpoint
from rioquant.testing.oracles import plain_cpu_buffers
from rioquant.testing.vision import LlamaVision, sample_image, transformers_image_embeddings

TEXT_PROMPT = "<|im_start|>user\nWhat is the capital of Brazil?<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PROMPT = "<|im_start|>user\n<__media__>What is in this picture?<|im_end|>\n<|im_start|>assistant\n"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="rioquant-demo-"))
    src = build_checkpoint(replace(KQUANT, mtp=True, num_experts=8, with_vision=True), work / "tiny-qwen35moe")
    out = work / "tiny-qwen35moe-Q4_K.gguf"
    mmproj = work / "mmproj-F16.gguf"
    print(f"checkpoint: {src}\n")
    rioquant = [sys.executable, "-m", "rioquant"]
    subprocess.run([*rioquant, "convert", str(src), "-o", str(out), "--type", "Q4_K", "--mmproj",
                    "--base-model", "Qwen/Qwen3.5-397B-A17B"], check=True)
    subprocess.run([*rioquant, "inspect", str(out)], check=True)
    subprocess.run([*rioquant, "inspect", str(mmproj)], check=True)

    from llama_cpp import Llama

    with plain_cpu_buffers():
        llm = Llama(model_path=str(out), n_ctx=128, n_gpu_layers=0, verbose=False)
    result = llm.create_completion(TEXT_PROMPT, max_tokens=12, temperature=0.0)
    llm.close()
    print("\nllama.cpp loaded the GGUF and answered the text prompt (random weights, so noise):")
    print(repr(result["choices"][0]["text"]))

    import llama_cpp

    # libllama warns of the jump in positions after an image (M-RoPE gives it max(h, w) positions):
    # expected, and llama-mtmd-cli prints it too; the demo keeps the output to its results
    quiet = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(quiet, None)
    image = sample_image()
    vision = LlamaVision(out, mmproj)
    try:
        embeddings = vision.image_embeddings(image)
        answer = vision.generate(IMAGE_PROMPT, image)
    finally:
        vision.close()
    reference = transformers_image_embeddings(src, image)
    cosine = (embeddings * reference).sum(-1) / np.linalg.norm(embeddings, axis=-1) / np.linalg.norm(reference, axis=-1)
    print(f"\nllama.cpp loaded {mmproj.name} and encoded a {image.shape[1]}x{image.shape[0]} image into "
          f"{embeddings.shape[0]} tokens; cosine with transformers' vision tower: min {cosine.min():.6f}")
    print("and answered the image prompt (noise again):")
    print(repr(answer))
    print(f"\nfiles are in {work}")


if __name__ == "__main__":
    main()
