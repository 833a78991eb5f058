"""check_gguf on files from gguf.GGUFWriter, and on hand-built corrupt headers.

Valid files are written by the `gguf` package and the summary is compared with what was written
and with gguf.GGUFReader. Corrupt ones are built field by field with `_gguf` (a few lines of struct,
so each count, length and type can be set to anything), or are a valid file cut short. Every
rejection must be a one-line UserError naming the file, quick and with little memory, whatever
count or length the file claims.
"""

from __future__ import annotations

import re
import struct
import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from llmquant.errors import UserError
from llmquant.formats.gguf.validate import TensorInfo, check_gguf


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _ti(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}qIQ", len(dims), *dims, ggml_type, offset)


def _gguf(kvs=(), infos=(), data=b"", magic=b"GGUF", version=3, n_tensors=None, n_kv=None, alignment=32) -> bytes:
    head = struct.pack("<4sIQQ", magic, version, len(infos) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


U32_ONE = _kv("k", V.UINT32, struct.pack("<I", 1))
F32_64 = _ti("w", [64], Q.F32, 0)  # 256 bytes


def _nested(depth: int) -> bytes:
    return _kv("n", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * (depth - 1) + struct.pack("<IQ", V.UINT8, 0))


def _write(path, alignment: int | None = None):
    """A small llama-style file: scalars, short and long arrays, a nested array, an F32 and a Q8_0 tensor."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint32("llama.block_count", 2)
    w.add_string("general.name", "tiny")
    w.add_float32("llama.rope.freq_base", 0.5)
    w.add_bool("flag", True)
    w.add_int64("neg", -7)
    w.add_array("short", ["a", "bc"])
    w.add_array("nested", [[1, 2], [3]])
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
    w.add_array("tokenizer.ggml.scores", [0.25] * 100)
    w.add_tensor("a", np.arange(3 * 64, dtype=np.float32).reshape(3, 64))
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("b", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rejects(path, fragment: str) -> None:
    """check_gguf fails with a one-line UserError naming the file and saying `fragment`, in well under
    a second and 1 MiB."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserError, match=re.escape(fragment)) as e:
            check_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0
    assert peak < 2**20
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_summary_matches_writer_and_reader(tmp_path):
    path = _write(tmp_path / "m.gguf")
    s = check_gguf(path)
    assert s.version == 3 and s.file_size == path.stat().st_size
    assert s.metadata == {
        "general.architecture": "llama", "llama.block_count": 2, "general.name": "tiny",
        "llama.rope.freq_base": 0.5, "flag": True, "neg": -7, "short": ["a", "bc"], "nested": [[1, 2], [3]],
        "tokenizer.ggml.tokens": "array[str] of 100", "tokenizer.ggml.scores": "array[float32] of 100",
    }
    assert s.tensors == [TensorInfo("a", "F32", (64, 3), 0, 768), TensorInfo("b", "Q8_0", (64, 4), 768, 4 * 2 * 34)]
    reader = gguf.GGUFReader(path)
    assert s.data_offset == reader.data_offset
    assert [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
            for t in reader.tensors] == [(t.name, t.type, t.shape, s.data_offset + t.offset, t.nbytes)
                                         for t in s.tensors]


def test_custom_alignment(tmp_path):
    s = check_gguf(_write(tmp_path / "m.gguf", alignment=256))
    assert s.metadata["general.alignment"] == 256
    assert s.data_offset % 256 == 0 and [t.offset for t in s.tensors] == [0, 768]
    assert s.data_offset == gguf.GGUFReader(tmp_path / "m.gguf").data_offset


def test_hand_built_baseline_is_valid(tmp_path):
    """The corruptions below each change one thing in files like this one, which pass."""
    path = tmp_path / "ok.gguf"
    path.write_bytes(_gguf([U32_ONE, _nested(8)], [F32_64, _ti("q", [32, 2], Q.Q8_0, 256)], bytes(256 + 68)))
    s = check_gguf(path)
    assert s.metadata == {"k": 1, "n": [[[[[[[[]]]]]]]]}
    assert [(t.name, t.type, t.shape, t.offset, t.nbytes) for t in s.tensors] == [
        ("w", "F32", (64,), 0, 256), ("q", "Q8_0", (32, 2), 256, 68)]
    path.write_bytes(_gguf([U32_ONE], version=2))
    assert check_gguf(path).version == 2


def test_truncated_anywhere(tmp_path):
    full = _write(tmp_path / "m.gguf").read_bytes()
    s = check_gguf(tmp_path / "m.gguf")
    # The header ends less than one alignment (32) before the data section.
    header_cuts = {n: "shorter than the 24-byte" if n < 24 else "truncated" for n in range(0, s.data_offset - 31, 7)}
    spans = [(s.data_offset + t.offset, t.nbytes) for t in s.tensors]
    data_cuts = {n: "past the end" for start, size in spans for n in (start, start + size - 1)}
    cut = tmp_path / "cut.gguf"
    for n, fragment in {**header_cuts, **data_cuts}.items():
        cut.write_bytes(full[:n])
        _rejects(cut, fragment)


def test_empty_missing_and_directory(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    _rejects(tmp_path / "empty.gguf", "file of 0 bytes is shorter than the 24-byte GGUF header")
    _rejects(tmp_path / "missing.gguf", "cannot open")
    _rejects(tmp_path, "cannot open")


BIG = 2**62
CORRUPT = {
    "wrong magic": (_gguf(magic=b"GGML"), "not a GGUF file"),
    "version 99": (_gguf(version=99), "unsupported GGUF version 99"),
    "version 1": (_gguf(version=1), "unsupported GGUF version 1"),
    "n_tensors 2**60": (_gguf([U32_ONE], [F32_64], bytes(256), n_tensors=2**60), "tensor count 1152921504606846976"),
    "n_kv 2**60": (_gguf([U32_ONE], n_kv=2**60), "key/value count 1152921504606846976"),
    "key length 2**62": (_gguf([struct.pack("<Q", BIG) + b"k" * 40]), f"truncated: key 0 needs {BIG} bytes"),
    "string value 2**62": (_gguf([_kv("s", V.STRING, struct.pack("<Q", BIG))]), "truncated: value of 's'"),
    "string in array 2**62": (_gguf([_kv("s", V.ARRAY, struct.pack("<IQQ", V.STRING, 1, BIG))]), "truncated"),
    "array count 2**62": (_gguf([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, BIG))]), f"array of {BIG} items"),
    "nested array count 2**62": (_gguf([_kv("a", V.ARRAY, struct.pack("<IQIQ", V.ARRAY, 1, V.UINT8, BIG))]),
                                 f"array of {BIG} items"),
    "arrays nested 9 deep": (_gguf([_nested(9)]), "nests arrays deeper than 8"),
    "unknown value type": (_gguf([_kv("x", 13, b"\0" * 8)]), "'x' has unknown value type 13"),
    "unknown array item type": (_gguf([_kv("x", V.ARRAY, struct.pack("<IQ", 99, 0))]), "unknown array item type 99"),
    "key not UTF-8": (_gguf([_kv(b"\xff\xfe", V.UINT8, b"\0")]), "key 0 is not UTF-8"),
    "duplicate key": (_gguf([U32_ONE, U32_ONE]), "duplicate key 'k'"),
    "alignment uint64": (_gguf([_kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "expected uint32"),
    "alignment 48": (_gguf([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "not a positive power"),
    "alignment 0": (_gguf([_kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "not a positive power"),
    "1000 dims": (_gguf(infos=[_ti("w", [1] * 1000, Q.F32, 0)], data=bytes(32)), "has 1000 dims, at most 4"),
    "5 dims": (_gguf(infos=[_ti("w", [1] * 5, Q.F32, 0)], data=bytes(32)), "has 5 dims, at most 4"),
    "dim 0": (_gguf(infos=[_ti("w", [64, 0], Q.F32, 0)], data=bytes(256)), "every dim must be positive"),
    "dim -1": (_gguf(infos=[_ti("w", [64, -1], Q.F32, 0)], data=bytes(256)), "every dim must be positive"),
    "2**66 elements": (_gguf(infos=[_ti("w", [2**32, 2**32, 4], Q.F32, 0)]), "more than 2**62 elements"),
    "ggml type 999": (_gguf(infos=[_ti("w", [64], 999, 0)], data=bytes(256)), "unknown ggml type 999"),
    "removed ggml type 4": (_gguf(infos=[_ti("w", [64], 4, 0)], data=bytes(256)), "unknown ggml type 4"),
    "row not whole blocks": (_gguf(infos=[_ti("w", [16], Q.Q8_0, 0)], data=bytes(64)),
                             "rows of 16, not a multiple of its block size 32"),
    "data past EOF": (_gguf(infos=[_ti("w", [64], Q.F32, 1024)], data=bytes(256)), "past the end of the file"),
    "data cut short": (_gguf(infos=[F32_64], data=bytes(255)), "past the end of the file"),
    "misaligned offset": (_gguf(infos=[_ti("w", [64], Q.F32, 4)], data=bytes(288)), "not a multiple of the alignment"),
    "overlap": (_gguf(infos=[F32_64, _ti("v", [64], Q.F32, 128)], data=bytes(512)), "tensors 'w' and 'v' overlap"),
    "duplicate tensor name": (_gguf(infos=[F32_64, _ti("w", [64], Q.F32, 256)], data=bytes(512)),
                              "duplicate tensor name 'w'"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_header_is_rejected(tmp_path, name):
    data, fragment = CORRUPT[name]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    _rejects(path, fragment)


def test_array_lengths_survive_the_header_summary():
    from llmquant.formats.gguf.validate import SHOWN_ITEMS, array_length

    assert array_length(["a", "b"]) == 2
    assert array_length(f"array[str] of {SHOWN_ITEMS + 1000}") == SHOWN_ITEMS + 1000
    assert array_length("a plain string") is None and array_length(7) is None
