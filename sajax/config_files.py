"""Loading `get_config()` files (configs/*.py) by path, the way `--config FILE` does, without importing them as
part of a package — so they work from a source checkout and from the installed `sajax.configs` alike."""

from __future__ import annotations

import importlib.util
import os
from importlib import resources
from pathlib import Path

import ml_collections


def load_module(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_sajax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the config file at `path`."""
    return load_module(path).get_config()


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config dict (`json.loads(cfg.to_json())`) as {"section.field": value}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(saved: dict, current: dict, defaults: dict, unchecked: tuple[str, ...] = ()
                   ) -> list[tuple[str, object, object]]:
    """(field, saved value, current value) of every flattened field whose value differs between two nested config
    dicts (`json.loads(cfg.to_json())`), sorted, but for fields starting with one of `unchecked`. A field `saved`
    lacks but `defaults` has (added by a later sajax) counts as saved at its default value."""
    saved, current, defaults = flatten(saved), flatten(current), flatten(defaults)
    for key in set(current) - set(saved):
        if key in defaults:
            saved[key] = defaults[key]
    return [(key, saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if not key.startswith(unchecked) and saved.get(key) != current.get(key)]


def bundled_config(name: str) -> str:
    """Path of configs/<name>: installed as the package `sajax.configs`, or beside `sajax/` in a source
    checkout."""
    try:
        return str(resources.files("sajax.configs").joinpath(name))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parent.parent / "configs" / name)


DEFAULT_CONFIG = bundled_config("tiny.py")  # the embedded default of the CLIs
