"""Recipes: YAML files on top of the schema in ``distill.config``, dotted overrides on top of them, and
the checks every value passes on the way in (``update``, ``validate``) and the resolved config's
YAML on the way out (``dump``, ``from_dict``).

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
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from distill import trackers
from distill.atomic import closest
from distill.config import Config, ConfigError, Range


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


# ----------------------------------------------------------------------------------------------
# Checking values against the schema

def update(cfg: Any, values: dict, source: str = "config", prefix: str = "") -> None:
    """Set ``values`` (nested dicts) on the dataclass ``cfg``, checking every key and type."""
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in RENAMED:
            RENAMED[dotted](cfg, value, source)
            continue
        if key not in hints:
            raise ConfigError(f"{source}: unknown key {dotted!r}{_closest_key(dotted, cfg, prefix)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} is a section; give a mapping of its keys")
            update(current, value, source, prefix=f"{dotted}.")
        else:
            setattr(cfg, key, _coerce(value, hints[key], dotted, source))


def _tensorboard(train: Any, value: Any, source: str) -> None:
    """``train.tensorboard``, the key before ``train.log_with``: ``true`` still logs to TensorBoard,
    with one line saying what it became; ``false`` (which every older run's config.yaml holds) says nothing."""
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: 'train.tensorboard' must be true or false, got {value!r} (it is now "
                          "train.log_with: tensorboard)")
    kept = [n for n in trackers.names(train.log_with) if n != "tensorboard"] + (["tensorboard"] if value else [])
    train.log_with = kept[0] if len(kept) == 1 else kept or None
    if value:
        warnings.warn(f"{source}: train.tensorboard is deprecated; it is read as train.log_with: tensorboard",
                      FutureWarning, stacklevel=2)


# Keys of older recipes and run folders, and what reads them now.
RENAMED = {"train.tensorboard": _tensorboard}


def _closest_key(dotted: str, cfg: Any, prefix: str) -> str:
    """A sibling key first (a typo), else any key of the schema (a key put in the wrong section)."""
    last = dotted.rsplit(".", 1)[-1]
    sibling = closest(last, [f.name for f in dataclasses.fields(cfg)])
    if sibling:
        match = f"{prefix}{sibling}"
    else:
        keys = all_keys(Config())
        by_last = {k.rsplit(".", 1)[-1]: k for k in keys}
        match = by_last.get(closest(last, by_last)) or closest(dotted, keys, cutoff=0.5)
    return f"; did you mean {match!r}?" if match else ""


def all_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` as the schema type ``tp``, then checked against the type's ``Range``."""
    value = _convert(value, tp, key, source)
    bound = _range(tp)
    if value is not None and bound is not None and not bound.contains(value):
        raise ConfigError(f"{source}: {key!r} must be {bound}, got {value!r}")
    return value


def _range(tp: Any) -> Range | None:
    """The Range of ``Annotated[..., Range(...)]``, also as the arm of ``... | None``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next((r for r in map(_range, typing.get_args(tp)) if r is not None), None)
    return next((m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)), None)


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"{source}: {key!r} must be {_type_name(tp)}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _convert(value, args[0], key, source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (`mixed_precision: no`)
            value = "no"
        if value not in args:
            close = closest(str(value), [str(a) for a in args])
            hint = f"; did you mean {close!r}?" if close else ""
            raise ConfigError(f"{source}: {key!r} must be one of {list(args)}, got {value!r}{hint}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail()
        return tuple(_convert(v, a, key, source) for v, a in zip(value, args))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [_convert(v, args[0], key, source) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    raise fail()


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return "a list of " + {str: "strings"}.get(args[0], _type_name(args[0]))
    if tp is type(None):
        return "null"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def validate(cfg: Config) -> Config:
    """Check a whole config before any work: every value against the schema (also those set from
    Python rather than through a recipe), then the rules that tie keys together."""
    update(Config(), dataclasses.asdict(cfg), source="config")
    d, t = cfg.data, cfg.train
    if (d.mixup > 0 or d.cutmix > 0) and d.mixup_prob > 0 and t.batch_size % 2:
        raise ConfigError(f"config: train.batch_size={t.batch_size} is odd, but mixup/cutmix pair the images of a batch; "
                          "use an even train.batch_size or set data.mixup=0 data.cutmix=0")
    if cfg.distill.kind != "none" and cfg.teacher.name is None and cfg.teacher.cache is None:
        raise ConfigError(f"config: distill.kind={cfg.distill.kind} needs a teacher; set teacher.name (see `distill teachers`) "
                          "or distill.kind=none")
    if t.log_with:
        trackers.check_names(t.log_with)
    if cfg.teacher.checkpoint is not None and cfg.teacher.pretrained:
        # A checkpoint named on top of a recipe that downloads ImageNet weights (as the built-in ones
        # do) is the user's choice; it wins, and the resolved config says so rather than both.
        warnings.warn(f"teacher.checkpoint={cfg.teacher.checkpoint} is used and teacher.pretrained=true is ignored "
                      "(nothing is downloaded); the resolved config has teacher.pretrained=false", stacklevel=2)
        cfg.teacher.pretrained = False
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain dict (tuples as lists) for writing the resolved config."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict) -> Config:
    cfg = Config()
    update(cfg, values, source="saved config")
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
