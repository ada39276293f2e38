"""Tokenized text: `data.tokenizer=PATH` (a tokenizer.json, or a directory holding one) through the
Hugging Face `tokenizers` library.

The text source (data.path: a text file or a folder of them, sorted by name; null: the embedded
corpus) is tokenized once into a cached flat token file, uint16 when the vocabulary fits in 16 bits
and uint32 otherwise, named by a hash of the tokenizer and the source (path, size, modification
time), under data.cache_dir (default ~/.cache/moesys/tokens). It is written to a temporary file and
renamed, with a progress bar, by whichever process needs it first (moesys-train's parent, before any
rank starts); later runs read the cache. The byte-level default (no tokenizer) is unchanged.
"""
from __future__ import annotations

import hashlib
import os
from typing import List, Optional, Tuple

import numpy as np

from .data import embedded_corpus
from .errors import ConfigError, ConfigFileNotFoundError

TOKENIZER_FILE = "tokenizer.json"
_CHUNK_CHARS = 1 << 20  # text encoded per batch call (split at line ends)


def tokenizer_file(path: str) -> str:
    """The tokenizer.json that data.tokenizer=`path` names (the file, or the one in the directory)."""
    f = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise ConfigFileNotFoundError(f"data.tokenizer={path!r}: no such file"
                                      + (f" ({TOKENIZER_FILE} in that directory)" if os.path.isdir(path) else ""))
    return f


def load_tokenizer(path: str):
    """The tokenizers.Tokenizer of data.tokenizer=`path`; ConfigError naming it when unreadable."""
    from tokenizers import Tokenizer

    f = tokenizer_file(path)
    try:
        return Tokenizer.from_file(f)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ConfigError(f"data.tokenizer={path!r}: {f} is not a readable tokenizer ({e})") from None


def vocab_size(path: str) -> int:
    return load_tokenizer(path).get_vocab_size(with_added_tokens=True)


def dtype_for(vocab: int) -> str:
    return "uint16" if vocab <= 1 << 16 else "uint32"


def _source_files(path: Optional[str]) -> List[str]:
    if path is None:
        return []
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if not f.startswith("."))
        if not files:
            raise ConfigError(f"data.path={path!r} is a folder with no text files")
        return files
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(f"data.path={path!r}: no such file or folder")
    return [path]


def _cache_name(tok_file: str, path: Optional[str], files: List[str]) -> str:
    h = hashlib.sha256()
    with open(tok_file, "rb") as f:
        h.update(f.read())
    if path is None:
        h.update(hashlib.sha256(embedded_corpus()).digest())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:24]


def _chunks(text: str) -> List[str]:
    out, i = [], 0
    while i < len(text):
        j = text.find("\n", i + _CHUNK_CHARS)
        j = len(text) if j < 0 else j + 1
        out.append(text[i:j])
        i = j
    return out


def token_source(path: Optional[str], tokenizer: str, cache_dir: Optional[str] = None,
                 use_tqdm: bool = True) -> Tuple[str, str]:
    """(token file, dtype) of the text `path` tokenized with `tokenizer`, made on first use (atomically)."""
    from tqdm import tqdm

    tok_file = tokenizer_file(tokenizer)
    files = _source_files(path)
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "moesys", "tokens")
    tok = load_tokenizer(tokenizer)
    dtype = dtype_for(tok.get_vocab_size(with_added_tokens=True))
    out = os.path.join(cache_dir, f"{_cache_name(tok_file, path, files)}.{dtype}.bin")
    if os.path.isfile(out):
        return out, dtype
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir={cache_dir!r} cannot be created ({e.strerror})") from None
    texts = [embedded_corpus().decode("utf-8")] if path is None else None
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            sources = texts if texts is not None else files
            bar = tqdm(total=len(sources), desc="tokenizing", unit="file", disable=not use_tqdm)
            for src in sources:
                if texts is None:
                    with open(src, encoding="utf-8", errors="replace") as f:
                        src = f.read()
                for enc in tok.encode_batch(_chunks(src), add_special_tokens=False):
                    np.asarray(enc.ids, dtype=dtype).tofile(fh)
                bar.update(1)
            bar.close()
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.getsize(tmp) == 0:
            raise ConfigError(f"data.path={path!r}: the text gives no tokens")
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out, dtype


def source_of(data) -> Tuple[Optional[str], str]:
    """(path, dtype) the trainer loads for a DataConfig: the tokenized cache with data.tokenizer, else
    data.path and data.dtype as they are."""
    if data.tokenizer is None:
        return data.path, data.dtype
    return token_source(data.path, data.tokenizer, data.cache_dir)
