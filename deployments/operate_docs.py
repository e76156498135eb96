"""The generated parts of docs/operate.md: the serving-config reference (from the pydantic schemas
in deployments/config.py and helios.config.EngineConfig), the metric reference (from
telemetry/metrics.py) and the autoscaling policy (from deployments/autoscaling.py).

    python -m deployments.operate_docs --write docs/operate.md    # refresh the generated blocks
    python -m deployments.operate_docs                            # print them

A field's meaning is its `description`, else the comment on its line or the comment lines just
above it in the source (how deployments/config.py documents its fields), else the dataclass
field's `help` (EngineConfig). tests/test_docs.py fails when the page is stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from deployments.config import ServeConfig
from helios.config import EngineConfig
from telemetry.metrics import METRICS

BLOCKS = {"config-reference": lambda: config_reference(), "metrics-reference": lambda: metrics_reference(),
          "autoscaling-policy": lambda: autoscaling_policy()}
_FIELD_LINE = re.compile(r"^    (\w+)\s*:")


def _source_comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line, or the comment lines right above it."""
    comments, pending = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# "))
            continue
        match = _FIELD_LINE.match(line)
        if match:
            trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            comments[match.group(1)] = " ".join(pending + ([trailing] if trailing else []))
        pending = []
    return comments


def _type_name(annotation: Any) -> str:
    name = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return name or re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", str(annotation)).replace("NoneType", "None")


def _constraints(metadata: list) -> str:
    words = []
    for item in metadata:
        for attr, fmt in (("ge", ">= {}"), ("gt", "> {}"), ("le", "<= {}"), ("lt", "< {}"),
                          ("min_length", "at least {} long"), ("pattern", "matches `{}`")):
            value = getattr(item, attr, None)
            if value is not None:
                words.append(fmt.format(value))
    return ", ".join(words)


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return f"`{field.default!r}`" if field.default is not None else "none"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel) or dataclasses.is_dataclass(value):
            return "(below)"
        return f"`{value!r}`" if not isinstance(value, list) or not value or not isinstance(
            value[0], BaseModel) else "one model with every default"
    return "required"


def _nested(annotation: Any) -> type | None:
    """The model or dataclass a field holds (directly or as list items)."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if inspect.isclass(candidate) and (issubclass(candidate, BaseModel) or dataclasses.is_dataclass(candidate)):
            return candidate
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _model_table(path: str, model: type[BaseModel], out: list[str]) -> None:
    comments, nested = _source_comments(model), []
    out += [f"### `{path}`" if path else "### top level", ""]
    if model.__doc__ and model.__doc__ is not BaseModel.__doc__:
        out += [inspect.cleandoc(model.__doc__), ""]
    out += ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        meaning = field.description or comments.get(name, "")
        out.append(f"| `{name}` | {_cell(_type_name(field.annotation))} | {_default(field)} | "
                   f"{_cell(_constraints(field.metadata))} | {_cell(meaning)} |")
        inner = _nested(field.annotation)
        if inner is not None:
            is_list = getattr(field.annotation, "__origin__", None) is list
            nested.append((f"{path}.{name}".lstrip(".") + ("[]" if is_list else ""), inner))
    out.append("")
    for inner_path, inner in nested:
        if dataclasses.is_dataclass(inner):
            _dataclass_table(inner_path, inner, out)
        else:
            _model_table(inner_path, inner, out)


def _dataclass_table(path: str, cls: type, out: list[str]) -> None:
    out += [f"### `{path}`", "", f"`{cls.__module__}.{cls.__name__}`'s options (`model` is the model's `source`).", "",
            "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if field.name == "model":
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = "none" if default is None else f"`{default!r}`"
        out.append(f"| `{field.name}` | {_cell(str(field.type))} | {shown} | "
                   f"{_cell(field.metadata.get('help', ''))} |")
    out.append("")


def config_reference() -> str:
    out: list[str] = []
    _model_table("", ServeConfig, out)
    return "\n".join(out).rstrip() + "\n"


def metrics_reference() -> str:
    out = ["| Prometheus series | kind | labels | filled by | meaning |", "| --- | --- | --- | --- | --- |"]
    for metric in METRICS:
        out.append(f"| `{metric.series}` | {metric.kind} | {', '.join(metric.labels)} | {metric.source} | "
                   f"{_cell(metric.help)} |")
    return "\n".join(out) + "\n"


def autoscaling_policy() -> str:
    """The `helios` policy as deployments/autoscaling.py describes it (its docstring up to the code
    notes, then its constants), so the page says what the code does."""
    from deployments import autoscaling

    paragraphs = inspect.cleandoc(autoscaling.__doc__).split("\n\n")
    prose = [p for p in paragraphs[1:] if not p.startswith("`desired_replicas`")]
    constants = ", ".join(f"`{name}` = {getattr(autoscaling, name)}" for name in ("DOWNSCALE_FILL", "DOWNSCALE_TTFT"))
    return "\n\n".join(prose) + f"\n\nIn the code: {constants}; the replicas report `{autoscaling.TTFT_METRIC}`.\n"


def fill(page: str) -> str:
    """The page with each `<!-- NAME:start -->...<!-- NAME:end -->` block regenerated."""
    for name, make in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in page or end not in page:
            raise ValueError(f"the page has no {start} ... {end} block")
        head, rest = page.split(start, 1)
        _, tail = rest.split(end, 1)
        page = f"{head}{start}\n{make()}{end}{tail}"
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployments.operate_docs", description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="the page whose generated blocks to refresh (docs/operate.md)")
    args = parser.parse_args(argv)
    if args.write:
        args.write.write_text(fill(args.write.read_text()))
    else:
        print(config_reference() + "\n" + metrics_reference())


if __name__ == "__main__":
    main()
