"""Vision oracles: an image through llama.cpp's multimodal library (libmtmd, as llama-server and
llama-mtmd-cli run it) and through transformers, on the same pixels.

- `sample_image`: a deterministic RGB picture (uint8, H x W x 3).
- `LlamaVision`: the text GGUF + mmproj loaded by llama-cpp-python's `mtmd_cpp` bindings; `image_embeddings`
  (what the projector hands the language model), `prompt_logits` (an image+text prompt decoded by
  `mtmd_helper_eval_chunks`, the last position's logits, plus the token ids llama.cpp built) and
  `generate` (a greedy answer, for `make demo`).
- `transformers_image_embeddings` / `transformers_prompt_logits`: Qwen3_5MoeForConditionalGeneration in
  float32 with transformers' own image processor.

The image's sides are multiples of patch x merge and its token count lies within llama.cpp's limits
for Qwen-VL projectors, so neither side resizes it; a 128x128 image on the tiny tower's 8x8 position
table needs no position interpolation either. None of this imports rioquant.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MEDIA_MARKER = "<__media__>"  # mtmd's default marker: where the image goes in the prompt
_QUIET = None  # the no-op log callback handed to libmtmd: kept alive here, ctypes does not own it


def _silence_mtmd(mtmd_cpp, llama_cpp) -> None:
    """libmtmd logs every image it encodes to stderr (and its helper re-points libllama's log there)."""
    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    mtmd_cpp.mtmd_log_set(_QUIET, None)
    mtmd_cpp.mtmd_helper_log_set(_QUIET, None)


def sample_image(height: int = 128, width: int = 128, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: uint8 (height, width, 3), the same for a given seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


class LlamaVision:
    """A text GGUF and its mmproj in llama.cpp (CPU, plain buffers), through libmtmd."""

    def __init__(self, model: Path | str, mmproj: Path | str, n_ctx: int = 512, n_threads: int = 2) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp

        from rioquant.testing.oracles import plain_cpu_buffers

        self.llama_cpp, self.mtmd = llama_cpp, mtmd_cpp
        _silence_mtmd(mtmd_cpp, llama_cpp)
        with plain_cpu_buffers():
            self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       n_gpu_layers=0, n_threads=n_threads, verbose=False)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, n_threads, False, False
        self.ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self.ctx:
            self.llm.close()
            raise RuntimeError(f"libmtmd could not load {mmproj}")

    def _chunks(self, prompt: str, image: np.ndarray):
        """mtmd_tokenize: text and image chunks of `prompt`, the image where MEDIA_MARKER stands."""
        m = self.mtmd
        height, width, _ = image.shape
        pixels = np.ascontiguousarray(image, dtype=np.uint8)
        bitmap = m.mtmd_bitmap_init(width, height, pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        data = prompt.encode()
        text = m.mtmd_input_text(data, len(data), False, True)
        bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
        status = m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), bitmaps, 1)
        m.mtmd_bitmap_free(bitmap)
        if status != 0:
            m.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({status})")
        return chunks

    def _layout(self, chunks) -> list[list[int] | int]:
        """Each chunk: its token ids (text) or its token count (image)."""
        m, out = self.mtmd, []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ids = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                out.append([ids[j] for j in range(n.value)])
            else:
                out.append(int(m.mtmd_input_chunk_get_n_tokens(chunk)))
        return out

    def image_embeddings(self, image: np.ndarray) -> np.ndarray:
        """The projector's output for `image`: float32 (n_image_tokens, text hidden size)."""
        m = self.mtmd
        chunks = self._chunks(MEDIA_MARKER, image)
        try:
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) == m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    n = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                    embd = m.mtmd_get_output_embd(self.ctx)
                    n_embd = self.llm.n_embd()
                    return np.ctypeslib.as_array(embd, shape=(n * n_embd,)).reshape(n, n_embd).copy()
            raise RuntimeError("mtmd_tokenize made no image chunk")
        finally:
            m.mtmd_input_chunks_free(chunks)

    def _decode_prompt(self, prompt: str, image: np.ndarray) -> tuple[list[list[int] | int], int]:
        """Clear the memory and decode the whole prompt (image at MEDIA_MARKER) with the last position's
        logits: (the chunk layout llama.cpp built, the next position)."""
        m, llama_cpp = self.mtmd, self.llama_cpp
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        chunks = self._chunks(prompt, image)
        try:
            layout = self._layout(chunks)
            n_past = llama_cpp.llama_pos(0)
            if m.mtmd_helper_eval_chunks(self.ctx, self.llm.ctx, chunks, 0, 0, self.llm.n_batch, True,
                                         ctypes.byref(n_past)) != 0:
                raise RuntimeError("mtmd_helper_eval_chunks failed")
            return layout, int(n_past.value)
        finally:
            m.mtmd_input_chunks_free(chunks)

    def _last_logits(self) -> np.ndarray:
        logits = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),)).copy()

    def prompt_logits(self, prompt: str, image: np.ndarray) -> tuple[np.ndarray, list[list[int] | int]]:
        """The last position's logits for an image+text prompt, float32 (n_vocab,), and the chunk layout
        llama.cpp built (text ids / image token counts)."""
        layout, _ = self._decode_prompt(prompt, image)
        return self._last_logits(), layout

    def generate(self, prompt: str, image: np.ndarray, max_tokens: int = 12) -> str:
        """Greedy answer to an image+text prompt, decoded as llama-mtmd-cli does (one token at a time)."""
        llama_cpp = self.llama_cpp
        _, n_past = self._decode_prompt(prompt, image)
        batch, answer = llama_cpp.llama_batch_init(1, 0, 1), []
        try:
            for _ in range(max_tokens):
                token = int(self._last_logits().argmax())
                if llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token):
                    break
                answer.append(token)
                batch.n_tokens, batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 1, token, n_past, 1, True
                batch.seq_id[0][0] = 0
                if llama_cpp.llama_decode(self.llm.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                n_past += 1
        finally:
            llama_cpp.llama_batch_free(batch)
        return self.llm.detokenize(answer).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.mtmd.mtmd_free(self.ctx)
        self.llm.close()


def _pixel_inputs(src: Path, image: np.ndarray):
    """transformers' image processor (the checkpoint's preprocessor_config.json), no resizing."""
    import transformers

    config = json.loads((src / "preprocessor_config.json").read_text())
    processor = transformers.Qwen2VLImageProcessorPil(
        patch_size=config["patch_size"], temporal_patch_size=config["temporal_patch_size"],
        merge_size=config["merge_size"], image_mean=config["image_mean"], image_std=config["image_std"])
    inputs = processor(images=[image], do_resize=False, return_tensors="pt")
    return inputs["pixel_values"], inputs["image_grid_thw"]


def _load(src: Path):
    import torch
    import transformers

    model = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    return model.eval()


def transformers_image_embeddings(src: Path | str, image: np.ndarray) -> np.ndarray:
    """Vision tower + merger on `image`: float32 (n_image_tokens, text hidden size)."""
    import torch

    src = Path(src)
    pixels, grid = _pixel_inputs(src, image)
    with torch.no_grad():
        out = _load(src).model.get_image_features(pixels, grid)
    return torch.cat(out.pooler_output).float().numpy()


def transformers_prompt_logits(src: Path | str, layout: Sequence[list[int] | int], image: np.ndarray,
                               image_token_id: int) -> np.ndarray:
    """The last position's logits for the prompt llama.cpp built (`layout`: text ids and, for the image,
    its token count, filled with image_token_id as transformers' processor would): float32 (n_vocab,)."""
    import torch

    src = Path(src)
    ids = torch.tensor([[t for part in layout for t in (part if isinstance(part, list) else [image_token_id] * part)]])
    pixels, grid = _pixel_inputs(src, image)
    kinds = (ids == image_token_id).int()  # text 0, image 1: what the processor returns beside input_ids
    with torch.no_grad():
        out = _load(src)(input_ids=ids, mm_token_type_ids=kinds, pixel_values=pixels, image_grid_thw=grid,
                         use_cache=False)
    return out.logits[0, -1].float().numpy()
