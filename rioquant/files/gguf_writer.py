"""gguf-py's GGUFWriter, with metadata arrays packed in one pass instead of item by item.

gguf-py packs an array by type-checking and `struct.pack`-ing each item into a growing bytearray: for the
248K-token vocabulary, its token types and its merges that is ~7 s of pure Python, paid by every output
file and by every `plan` that lays a header out to count its bytes. The GGUF array rule is small and fixed
(item type, count, then each item: a scalar, or a u64 length and UTF-8 bytes), so string and integer
arrays are packed here at once; everything else, and any array gguf-py would reject (mixed item
types), goes through gguf-py's own code. tests/test_gguf_writer.py holds the bytes equal to gguf-py's.
"""

import struct
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType

# Integer items by numpy, which raises on a value out of range as struct.pack does. Floats stay with gguf-py:
# numpy would round an out-of-range float32 to inf where struct.pack raises, and no float array is large.
_INTEGER_ITEM = {
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "u2", GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4", GGUFValueType.INT32: "i4", GGUFValueType.UINT64: "u8", GGUFValueType.INT64: "i8",
}


def _never(item: Any) -> bool:
    return False


_ITEM_CHECK = {  # token types are IntEnum members, which are ints; a bool is an int to Python, not to GGUF
    GGUFValueType.STRING: lambda item: type(item) is str,
    **dict.fromkeys(_INTEGER_ITEM, lambda item: isinstance(item, int) and type(item) is not bool),
}


class GGUFWriter(gguf.GGUFWriter):
    """Drop-in for gguf.GGUFWriter whose metadata arrays of strings or integers pack in one pass."""

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool, sub_type: GGUFValueType | None = None) -> bytes:
        if vtype is not GGUFValueType.ARRAY or not isinstance(val, list) or not val:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        item_type = sub_type if sub_type is not None else GGUFValueType.get_type(val[0])
        body = self._pack_items(val, item_type)
        if body is None:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = self._pack("I", vtype) if add_vtype else b""
        return head + self._pack("I", item_type) + self._pack("Q", len(val)) + body

    def _pack_items(self, items: list, item_type: GGUFValueType) -> bytes | None:
        """The items' bytes, or None where gguf-py's own packing must decide (and raise, if it would):
        float items, and items of another Python type than the item type's (a bool among ints)."""
        if not all(map(_ITEM_CHECK.get(item_type, _never), items)):
            return None
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        if item_type is GGUFValueType.STRING:
            length = struct.Struct(f"{order}Q").pack
            encoded = [item.encode("utf-8") for item in items]
            return b"".join(length(len(e)) + e for e in encoded)
        return np.asarray(items, dtype=f"{order}{_INTEGER_ITEM[item_type]}").tobytes()
