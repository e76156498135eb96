"""A GGUF file's header (config, tokenizer, tensor table), parsed once per file and then cached.

transformers builds a config and a tokenizer from a GGUF through gguf's pure-Python reader,
which walks every metadata field, the whole vocabulary included; the weights need that walk
too, to learn where each tensor starts. Measured on a 2-core CPU: 7.7 s for SmolLM2's
49k-token vocabulary, 19 s for Qwen2.5's 152k and 26 s for Gemma 3's 262k, on every load. A
controller that changes a replica's depth pays it on every change, and so does every test.

The first load of a file writes what the walk gives to
``$HELIOS_CACHE_DIR/_gguf_headers/<key>/`` (beside the assembled models): the config and the
tokenizer as transformers saves them, and ``tensors.json`` with each tensor's type, array shape
and byte offset. Later loads read those (0.5-4.6 s, the tokenizer's vocabulary dominating) and
memory-map the tensors straight from the GGUF. The key hashes the file's path, size and
modification time and the transformers version, so a rewritten file or a new transformers
parses again. A cache that cannot be written (read-only home) is skipped with a warning, and one
that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from helios.model_cache import ModelLoadError, cache_dir

logger = logging.getLogger("helios")

FORMAT = 1  # bump when what an entry holds changes
TABLE = "tensors.json"  # written last: its presence marks a complete entry


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes are in the file, as gguf's reader would present them."""

    tensor_type: int  # gguf.GGMLQuantizationType
    dtype: str  # numpy dtype of the raw array (uint8 for quantized blocks)
    shape: tuple[int, ...]  # the raw array's shape
    offset: int  # from the start of the file

    def array(self, file: np.memmap) -> np.ndarray:
        return np.ndarray(self.shape, np.dtype(self.dtype), buffer=file, offset=self.offset)

    @property
    def quant_type(self) -> Any:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.tensor_type)


@dataclass
class GGUFHeader:
    config: Any  # the transformers config
    tokenizer: Any  # the transformers tokenizer, or None when the file carries none
    architecture: str  # general.architecture: llama, qwen2, gemma3...
    tensors: dict[str, GGUFTensor]  # by GGUF tensor name


def read_header(path: Path, load_tokenizer: bool = True) -> GGUFHeader:
    """The header of the GGUF at `path`: from the cache when it holds this file, else parsed (and
    cached, tokenizer included). `load_tokenizer=False` skips reading a cached tokenizer."""
    entry = _entry_dir(path)
    if (entry / TABLE).is_file():
        try:
            return _read_entry(entry, load_tokenizer)
        except Exception as exc:  # a damaged entry is rebuilt, never trusted
            logger.warning("the cached GGUF header %s cannot be read (%s); parsing %s again", entry, exc, path.name)
            shutil.rmtree(entry, ignore_errors=True)
    header = _parse(path)
    _write_entry(entry, header)
    return header


def _entry_dir(path: Path) -> Path:
    import transformers

    resolved = path.resolve()
    stat = resolved.stat()
    identity = f"{FORMAT}|{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_dir() / "_gguf_headers" / f"{resolved.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _read_entry(entry: Path, load_tokenizer: bool) -> GGUFHeader:
    from transformers import AutoConfig, AutoTokenizer

    table = json.loads((entry / TABLE).read_text())
    config = AutoConfig.from_pretrained(entry, local_files_only=True)
    wanted = table["tokenizer"] and load_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True) if wanted else None
    tensors = {name: GGUFTensor(t["type"], t["dtype"], tuple(t["shape"]), t["offset"])
               for name, t in table["tensors"].items()}
    return GGUFHeader(config, tokenizer, table["architecture"], tensors)


def _write_entry(entry: Path, header: GGUFHeader) -> None:
    """Write to a temporary folder beside the entry and rename it into place, so that a reader
    never sees half an entry; a concurrent writer that wins the rename is as good."""
    scratch = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".partial-"))
        header.config.save_pretrained(scratch)
        if header.tokenizer is not None:
            header.tokenizer.save_pretrained(scratch)
        table = {"format": FORMAT, "architecture": header.architecture, "tokenizer": header.tokenizer is not None,
                 "tensors": {name: {"type": t.tensor_type, "dtype": t.dtype, "shape": list(t.shape),
                                    "offset": t.offset} for name, t in header.tensors.items()}}
        (scratch / TABLE).write_text(json.dumps(table))
        os.rename(scratch, entry)
        scratch = None
    except OSError as exc:
        if not (entry / TABLE).is_file():  # not another process's entry: say why the next load is slow too
            logger.warning("cannot cache the GGUF header in %s (%s); every load will parse the file", entry, exc)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _parse(path: Path) -> GGUFHeader:
    """Walk the file once with gguf's reader, shared by transformers' config and tokenizer readers."""
    import gguf
    from transformers import AutoConfig
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    with _one_reader(path):
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        except Exception as exc:  # transformers raises many types for a bad file
            raise ModelLoadError(f"cannot read the model config of {path}: {exc}") from exc
        # AutoTokenizer would walk the metadata again only to pick the class; the config names it
        tokenizer_class = TOKENIZER_MAPPING.get(type(config), None)
        try:
            from transformers import AutoTokenizer

            tokenizer = (tokenizer_class or AutoTokenizer).from_pretrained(
                path.parent, gguf_file=path.name, local_files_only=True)
        except Exception:  # a file without a vocabulary is still usable with token ids
            tokenizer = None
        reader = gguf.GGUFReader(path)  # the one transformers made, or the first
    tensors = {t.name: GGUFTensor(int(t.tensor_type), t.data.dtype.str, tuple(t.data.shape), int(t.data_offset))
               for t in reader.tensors}
    return GGUFHeader(config, tokenizer, str(reader.fields["general.architecture"].contents()), tensors)


@contextmanager
def _one_reader(path: Path) -> Iterator[None]:
    """While open, every gguf.GGUFReader of `path` made in this process (transformers makes one
    for the config and one for the tokenizer, and the tensor table needs one) is the same one, made once."""
    import gguf

    original, shared, key = gguf.GGUFReader, {}, path.resolve()

    def reader(file, *args, **kwargs):
        if Path(file).resolve() != key or args or kwargs:
            return original(file, *args, **kwargs)
        if "reader" not in shared:
            shared["reader"] = original(file)
        return shared["reader"]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
