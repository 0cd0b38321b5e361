"""rioquant's GGUFWriter packs metadata arrays in one pass: its bytes must be gguf-py's, item for item."""

from __future__ import annotations

import io
import struct

import gguf
import pytest

from rioquant.files.gguf_writer import GGUFWriter

ARRAYS = {  # key: (value, sub_type): the vocabulary's kinds of arrays, and the ones gguf-py must still decide
    "tokens": (["hello", "Ġwörld", "<|im_end|>", "", "日本", "\x00\n"] * 50, None),
    "types": ([gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, 1, 6] * 50, None),
    "u8": ([0, 255, 7], gguf.GGUFValueType.UINT8),
    "i64": ([-(2**62), 2**62], gguf.GGUFValueType.INT64),
    "sections": ([11, 11, 10, 0], None),
    "floats": ([0.5, -2.0, 1e-9], None),
    "bools": ([True, False], None),
    "one": (["x"], None),
}


def header_bytes(writer_class: type[gguf.GGUFWriter], endianess: gguf.GGUFEndian, arrays: dict) -> bytes:
    writer = writer_class(None, "qwen35moe", endianess=endianess)
    writer.add_string("general.name", "test")
    for key, (value, sub_type) in arrays.items():
        writer.add_array(key, value) if sub_type is None else writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type)
    out = io.BytesIO()
    writer.fout = [out]
    writer.state = gguf.gguf_writer.WriterState.EMPTY
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    return out.getvalue()


@pytest.mark.parametrize("endianess", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG])
def test_metadata_bytes_equal_gguf_pys(endianess):
    assert header_bytes(GGUFWriter, endianess, ARRAYS) == header_bytes(gguf.GGUFWriter, endianess, ARRAYS)


@pytest.mark.parametrize("value,sub_type", [
    (["a", 1], None),  # mixed item types
    ([256], gguf.GGUFValueType.UINT8),  # out of range
    ([1, True], None),  # a bool among ints
])
def test_arrays_gguf_py_rejects_are_rejected(value, sub_type):
    for writer_class in (gguf.GGUFWriter, GGUFWriter):
        with pytest.raises((ValueError, OverflowError, struct.error)):
            header_bytes(writer_class, gguf.GGUFEndian.LITTLE, {"bad": (value, sub_type)})
