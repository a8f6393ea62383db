"""Token sources for the GPT example: the Python standard library's own source (default, no
download), a user text file (bytes), or a nanoGPT-format uint16 token ``.bin``."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch


def stdlib_bytes(max_bytes: int = 4_000_000) -> bytes:
    """Concatenated top-level ``*.py`` files of the standard library, sorted by name: deterministic
    on one Python version, present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for f in sorted(root.glob("*.py")):
        b = f.read_bytes()
        out.append(b)
        n += len(b)
        if n >= max_bytes:
            break
    if not out:
        raise FileNotFoundError(f"no Python sources under {root}; pass data.path=<a text file>")
    return b"".join(out)[:max_bytes]


def load_tokens(source: str = "stdlib", max_bytes: int = 4_000_000) -> tuple[torch.Tensor, int]:
    """``(tokens, vocab_size)``: byte-level (vocab 256) for "stdlib" and text files; uint16 ids for ``.bin``."""
    if source == "stdlib":
        data = stdlib_bytes(max_bytes)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), 256
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data.path {source!r} does not exist")
    if path.suffix == ".bin":
        arr = np.memmap(path, dtype=np.uint16, mode="r")
        toks = torch.from_numpy(np.array(arr[:max_bytes], dtype=np.int64))
        return toks, int(toks.max()) + 1
    data = path.read_bytes()[:max_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), 256


def decode(ids: list[int], vocab_size: int) -> str:
    """Bytes -> text (invalid UTF-8 replaced); token ids are shown raw for non-byte vocabularies."""
    if vocab_size <= 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(map(str, ids))
