"""Real CLIP BPE tokenizers for tests, built offline from open_clip's bundled vocabulary.

The SD1.5 text encoder and SDXL's second encoder both use the 49408-entry CLIP BPE vocabulary.
open_clip ships it as ``bpe_simple_vocab_16e6.txt.gz``; Hugging Face tokenizers want a
``vocab.json`` plus ``merges.txt``, so both are derived once into a temp folder and reused.
Token ids must match the released CLIP vocabulary exactly (face</w> = 1710, and so on), which is
why the order of the vocabulary below matters.

open_clip is installed without its dependencies, so it is located but never imported.

Usage from any test module (``tests/`` is on ``sys.path`` because it has no ``__init__.py``)::

    from clip_vocab import sd15_tokenizer, sdxl_tokenizer_2
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile

import pytest

VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# The gz file starts with a header line; CLIP's own loader keeps exactly this many merges after it,
# which leaves room for 2 * 256 byte tokens and the two specials in a 49408 vocabulary.
N_MERGES = VOCAB_SIZE - 2 * 256 - 2
_CACHE_NAME = "consistentid-clip-bpe-v1"


def bpe_gz_path() -> str | None:
    """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz``, or None when open_clip is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def byte_symbols() -> list[str]:
    """The 256 single-character symbols of byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; every other byte is given an
    unused code point from 256 upwards so that no symbol is whitespace or a control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {b: chr(b) for b in printable}
    spare = 256
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(spare)
            spare += 1
    return [symbols[b] for b in printable] + [symbols[b] for b in range(256) if b not in printable]


def _read_merges(gz_path: str) -> list[str]:
    with gzip.open(gz_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES:
        raise ValueError(f"{gz_path} holds {len(merges)} merges, expected {N_MERGES}")
    return merges


def _write_atomic(path: str, text: str) -> None:
    # Parallel test workers may build the same folder; a rename never exposes a half-written file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=None)
def clip_vocab_dir() -> str:
    """Folder holding ``vocab.json`` and ``merges.txt``; skips the calling test if open_clip is absent."""
    gz_path = bpe_gz_path()
    if gz_path is None:
        pytest.skip("open_clip's bpe_simple_vocab_16e6.txt.gz is not installed")
    folder = os.path.join(tempfile.gettempdir(), _CACHE_NAME)
    vocab_file = os.path.join(folder, "vocab.json")
    merges_file = os.path.join(folder, "merges.txt")
    if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
        return folder
    os.makedirs(folder, exist_ok=True)

    merges = _read_merges(gz_path)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"derived CLIP vocabulary has {len(vocab)} distinct entries, expected {VOCAB_SIZE}")

    _write_atomic(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write_atomic(vocab_file, json.dumps(vocab, ensure_ascii=False))
    return folder


def _files() -> dict[str, str]:
    folder = clip_vocab_dir()
    return {
        "vocab_file": os.path.join(folder, "vocab.json"),
        "merges_file": os.path.join(folder, "merges.txt"),
    }


def _build(pad_token: str, fast: bool):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    cls = CLIPTokenizerFast if fast else CLIPTokenizer
    return cls(
        **_files(),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=77,
    )


def sd15_tokenizer(fast: bool = False):
    """A fresh SD1.5 / CLIP-L tokenizer: pads with EOS (49407), as the SD1.5 repositories do."""
    return _build(EOS, fast)


def sdxl_tokenizer_2(fast: bool = False):
    """A fresh SDXL ``tokenizer_2`` (bigG): same vocabulary, but pads with "!" (id 0)."""
    return _build("!", fast)
