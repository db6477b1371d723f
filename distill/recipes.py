"""Recipes: YAML files on top of the schema in ``distill.config``, and dotted overrides on top of them.

    base: cifar10_deit_tiny        # optional: start from another recipe (a name or a path)
    data: {source: uoft-cs/cifar10, img_size: 32}
    optim: {lr: 1.0e-3}

``load_recipe(name_or_path, ["optim.lr=1e-3"])`` resolves defaults <- base recipe(s) <- the recipe
<- overrides. A built-in recipe is found by name in the recipes/ folder; a bad name, key, type or
YAML text is a one-line ``ConfigError`` (the closest valid name or key comes with it). ``describe``
gives the rows of ``distill train --help``.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import yaml

from distill.atomic import closest
from distill.config import Config, ConfigError, update, validate


def recipe_dirs() -> list[Path]:
    """The top-level recipes/ of a source checkout, then <prefix>/share/deit-distill/recipes (wheels)."""
    return [Path(__file__).resolve().parents[1] / "recipes", Path(sys.prefix) / "share" / "deit-distill" / "recipes"]


def list_recipes() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.yaml")) if d.is_dir() else []:
            found.setdefault(p.stem, p)
    return found


def find_recipe(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    recipes = list_recipes()
    if str(name_or_path) not in recipes:
        close = closest(str(name_or_path), recipes)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ConfigError(f"unknown recipe {str(name_or_path)!r}{hint} (`distill recipes` lists them)")
    return recipes[str(name_or_path)]


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Defaults <- base recipe(s) <- this recipe <- ``key=value`` overrides."""
    path = find_recipe(name_or_path)
    raw = _read_yaml(path)
    cfg = Config(name=path.stem)
    _apply_recipe(cfg, raw, source=str(path), seen={path.resolve()})
    for item in overrides or []:
        apply_override(cfg, item)
    return validate(cfg)


def _parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load``, whose errors (a syntax error, a ``!!python/...`` tag, which it never
    runs) become one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}".replace("\n", " ")) from e


def _read_yaml(path: Path) -> dict:
    raw = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (data:, student:, ...), not {type(raw).__name__}")
    return raw


def _apply_recipe(cfg: Config, raw: dict, source: str, seen: set[Path]) -> None:
    raw = dict(raw)
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{source}: 'base' must be a recipe name or a path, got {base!r}")
        # A path is relative to the recipe that names it, so a recipe folder works from anywhere.
        is_path = base.endswith((".yaml", ".yml")) or "/" in base or "\\" in base
        base_path = find_recipe(Path(source).parent / base if is_path else base)
        if base_path.resolve() in seen:
            raise ConfigError(f"{source}: recipe base chain loops back to {base_path}")
        _apply_recipe(cfg, _read_yaml(base_path), str(base_path), seen | {base_path.resolve()})
    update(cfg, raw, source=source)


def apply_override(cfg: Config, item: str) -> None:
    """``section.key=value`` with a YAML value (``1e-3`` is read as a number where a number is due)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    key, text = item.split("=", 1)
    value = _parse_yaml(text, f"override {item!r}") if text.strip() else None
    if isinstance(value, bool) and text.strip().lower() not in ("true", "false"):
        value = text.strip()  # YAML 1.1 reads yes/no/on/off as booleans; a string key wants the word
    nested: Any = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    update(cfg, nested, source="command line")


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for `--help`: the field docstrings are read from the source."""
    rows = []
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), docs.get(f.name, "")))
    return rows
