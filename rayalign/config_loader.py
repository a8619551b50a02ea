"""Resolve a `Config` from defaults, an optional YAML file and `key=value` overrides.

Precedence: dataclass defaults < YAML < command-line overrides. Every value goes through one
type-directed parser (`coerce`), so `train.num_workers=2` on the command line and `num_workers: 2` in
YAML become the same int. Unknown keys fail with the closest valid key suggested.

It does not run anything; `prepare_run_dir` (creating run.dir, after its checks) lives in `rayalign.run_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rayalign.config import Config, ConfigError


def section_types() -> dict[str, type]:
    """Section name -> its dataclass (`{"loss": LossConfig, ...}`)."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every dotted key a YAML file or an override may set."""
    return [f"{s}.{name}" for s, cls in section_types().items() for name in _field_types(cls)]


def _unknown_key(key: str) -> ConfigError:
    match = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {match[0]}?" if match else ""
    return ConfigError(f"{key}: unknown config key{hint}")


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _coerce_scalar(value: Any, tp: type, key: str) -> Any:
    wrong = ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong
    if isinstance(value, bool):  # bool is an int subclass: never accept it as a number
        raise wrong
    if tp is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-6" as a string; parse it here
                return float(value.strip())
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _yaml_value(text: str, key: str) -> Any:
    """A command-line value written in YAML (`[1, 2]`, `{a: 1}`); ConfigError naming `key` if it is not."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: invalid YAML value {text!r}: {_one_line(exc)}") from None


def _parse_list_text(text: str, key: str) -> list:
    text = text.strip()
    if text.startswith("["):
        parsed = _yaml_value(text, key)
        if not isinstance(parsed, (list, type(None))):
            raise ConfigError(f"{key}: expected a list, got {text!r}")
        return list(parsed or [])
    return [part.strip() for part in text.split(",") if part.strip()]


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        names = " or ".join("null" if a is type(None) else a.__name__ for a in args)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        items = _parse_list_text(value, key) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(item, item_type, f"{key}[{i}]") for i, item in enumerate(items))
    if origin is dict:
        parsed = _yaml_value(value, key) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return parsed
    return _coerce_scalar(value, tp, key)


# Keys that moved: old dotted key -> the new one(s). The old key still works (YAML, overrides, a run's
# recorded config.yaml) and prints one deprecation line on stderr; `rayalign show` and config.yaml write the
# new keys. model.dtype was one dtype for inference and training (bf16 training without float32 master
# weights); each inference stage now has its own, and training keeps float32 weights (train.precision).
RENAMED = {"loop.eval_prompts": ("eval.prompts",),
           "model.dtype": ("generate.dtype", "judge.dtype", "ref.dtype")}


def _renamed(key: str) -> tuple[str, ...]:
    new = RENAMED.get(key)
    if new is None:
        return (key,)
    note = " (training: train.precision)" if key == "model.dtype" else ""
    print(f"rayalign: {key} is deprecated: read as {', '.join(new)}{note} (write {' and '.join(new)} instead)",
          file=sys.stderr, flush=True)
    return new


def _set_override(tree: dict, key: str, value: Any) -> None:
    for new_key in _renamed(key):
        section, _, name = new_key.partition(".")
        sections = section_types()
        if section not in sections or name not in _field_types(sections[section]):
            raise _unknown_key(new_key)
        tree.setdefault(section, {})[name] = value


def parse_override(text: str) -> tuple[str, str]:
    """Split `section.key=value`; the value stays text until `coerce` sees the field type."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text}: overrides are written key=value, e.g. loss.beta=0.05")
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    """Read a config YAML (safe_load) as a {section: {key: value}} tree of overrides."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # a directory, no permission, ...
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {_one_line(exc)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config file is a mapping of sections, got {type(tree).__name__}")
    flat: dict = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise (_unknown_key(str(section)) if section not in section_types()
                   else ConfigError(f"{section}: expected a mapping of keys, got {body!r}"))
        for name, value in body.items():
            _set_override(flat, f"{section}.{name}", value)
    return flat


def _one_line(exc: Exception) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _move_renamed(tree: dict) -> dict:
    """`tree` with the `RENAMED` keys under their new names; both names at once must agree."""
    tree = {section: dict(body) if isinstance(body, dict) else body for section, body in tree.items()}
    for old, targets in RENAMED.items():
        old_section, old_name = old.split(".")
        if not isinstance(tree.get(old_section), dict) or old_name not in tree[old_section]:
            continue
        value = tree[old_section].pop(old_name)
        _renamed(old)
        for new in targets:
            new_section, new_name = new.split(".")
            target = tree.setdefault(new_section, {})
            if new_name in target and target[new_name] != value:
                raise ConfigError(f"{old}: renamed {new}, and both are set ({value!r} and {target[new_name]!r}); "
                                  f"keep {new} only")
            target[new_name] = value
    return tree


def build_config(tree: dict) -> Config:
    """Instantiate the dataclasses from a {section: {key: raw value}} tree (renamed keys moved first)."""
    tree = _move_renamed(tree)
    sections = {}
    for section, cls in section_types().items():
        types_ = _field_types(cls)
        values = {name: coerce(raw, types_[name], f"{section}.{name}") for name, raw in tree.get(section, {}).items()}
        sections[section] = cls(**values)
    config = Config(**sections)
    check_known_names(config)
    return config


def check_known_names(config: Config) -> None:
    """Names defined outside the config schema, checked now rather than when a stage loads the data."""
    if config.data.format is not None:
        from rayalign.config_checks import _one_of
        from rayalign.data.formats import FORMATS

        _one_of(config.data.format, "data.format", FORMATS)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML at `path` (if any), then `key=value` overrides."""
    tree = read_yaml(path) if path else {}
    for text in overrides:
        key, value = parse_override(text)
        _set_override(tree, key, value)
    return build_config(tree)


def config_to_dict(config: Config) -> dict:
    """A plain nested dict (tuples as lists) that `load_config` reads back to an equal Config."""
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return {section: {k: plain(v) for k, v in dataclasses.asdict(getattr(config, section)).items()}
            for section in section_types()}


def dump_config(config: Config) -> str:
    """The fully resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
