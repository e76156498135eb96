"""``helios models``: the catalog's models, whether each is installed, its size and licence."""

from __future__ import annotations

import argparse
import json

from helios.catalog import CATALOG, DEFAULT_MODEL, CatalogEntry
from helios.model_cache import missing_packages, verify

COLUMNS = ("alias", "installed", "size", "arch", "layers", "exit heads", "licence")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``models`` on the ``helios`` command's subparsers."""
    parser = subparsers.add_parser("models", help="list the models Helios knows by name and whether they are installed")
    parser.add_argument("--json", action="store_true", help="one JSON object per model instead of a table")
    parser.add_argument("--verify", action="store_true",
                        help="also hash each installed model's file (assembles split models into the cache first)")
    parser.set_defaults(func=run_models)
    return parser


def describe(entry: CatalogEntry) -> dict:
    """What `helios models` says about one catalog entry."""
    missing = missing_packages(entry)
    return {
        "alias": entry.alias,
        "default": entry.alias == DEFAULT_MODEL,
        "installed": "yes" if not missing else f"no ({len(entry.packages) - len(missing)}/{len(entry.packages)} packages)",
        "size": f"{entry.size / 1e6:.0f} MB",
        "arch": entry.arch,
        "layers": entry.num_layers,
        "exit heads": entry.exit_heads or "-",
        "licence": entry.licence,
        "description": entry.description,
        "chat_template": entry.chat_template,
        "install": entry.install_line(missing) if missing else None,
    }


def _table(rows: list[dict]) -> str:
    shown = [{**row, "alias": row["alias"] + (" (default)" if row["default"] else "")} for row in rows]
    cells = [[str(row[c]) for c in COLUMNS] for row in shown]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [list(COLUMNS), *cells]]
    return "\n".join(lines)


def run_models(args: argparse.Namespace) -> int:
    rows = []
    for entry in CATALOG.values():
        row = describe(entry)
        if args.verify and row["install"] is None:
            row["sha256_ok"] = verify(entry) == entry.sha256
        rows.append(row)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows))
        for row in rows:
            if row["install"]:
                print(f"to install {row['alias']}: {row['install']}")
            if "sha256_ok" in row:
                print(f"{row['alias']}: sha256 {'ok' if row['sha256_ok'] else 'MISMATCH'}")
    return 0 if all(row.get("sha256_ok", True) for row in rows) else 1

