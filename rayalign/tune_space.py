"""`tune.space`: parse and validate a sweep's search space, and build each trial's config.

    tune:
      space:
        loss.type: {grid: [dpo, mallows_theta]}    # every value, crossed with the other grids
        loss.beta: {choice: [0.01, 0.05, 0.1]}     # one value drawn per sample
        optim.lr: {loguniform: [1.0e-7, 1.0e-5]}   # also {uniform: [lo, hi]}

Keys are the dotted config keys of `rayalign show`; a trial's config is the sweep's resolved config with
the trial's values put through the same override path as `key=value` (`rayalign.config_loader`), so a
value that `rayalign train` would reject fails here, before Ray starts, naming the key.

No Ray here (the driver, `rayalign.tune`, turns dimensions into Ray Tune's search space objects).
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any

from rayalign.config import Config, ConfigError
from rayalign.config_loader import _set_override, build_config, config_to_dict

KINDS = ("grid", "choice", "uniform", "loguniform")
RANGE_KINDS = ("uniform", "loguniform")
# Keys a trial cannot take from the space: the run directory and cache are the sweep's, and a trial is a
# training run, not a sweep.
RESERVED_SECTIONS = ("run", "tune")
MAX_CHECKED_COMBINATIONS = 4096  # past this, each value is checked alone rather than every grid point


@dataclass(frozen=True)
class Dimension:
    """One swept key: grid/choice hold the values, uniform/loguniform hold (low, high)."""

    key: str
    kind: str
    values: tuple


def _where(key: str) -> str:
    return f"tune.space.{key}"


def _parse_range(key: str, kind: str, values: list) -> tuple:
    shape = f"{_where(key)}: {kind} takes [low, high]"
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{shape}, two numbers; got {values!r}")
    low, high = (float(v) for v in values)
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"{shape} with low < high; got {values!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{shape} with 0 < low; got {values!r}")
    return low, high


def parse_dimension(key: Any, spec: Any) -> Dimension:
    """One `key: {kind: values}` entry of `tune.space`, shape-checked (the values are checked later)."""
    if not isinstance(key, str):
        raise ConfigError(f"tune.space: keys are dotted config keys like loss.beta; got {key!r}")
    _set_override({}, key, None)  # unknown key -> ConfigError with the closest valid key suggested
    if key.partition(".")[0] in RESERVED_SECTIONS:
        raise ConfigError(f"{_where(key)}: {key} is set by the sweep itself and cannot be swept")
    example = f"e.g. {key}: {{grid: [a, b]}} or {{loguniform: [1.0e-7, 1.0e-5]}}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{_where(key)}: expected one of {{{' | '.join(KINDS)}: ...}}, {example}; got {spec!r}")
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{_where(key)}: unknown search kind {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{_where(key)}: {kind} takes a non-empty list, {example}; got {values!r}")
    if kind in RANGE_KINDS:
        return Dimension(key, kind, _parse_range(key, kind, values))
    return Dimension(key, kind, tuple(values))


def parse_space(space: dict) -> list[Dimension]:
    """All dimensions of `tune.space`, in file order; an empty space is an error (nothing to sweep)."""
    if not space:
        raise ConfigError("tune.space: empty; give at least one key, e.g. loss.beta: {grid: [0.05, 0.1]}")
    return [parse_dimension(key, spec) for key, spec in space.items()]


def trial_tree(base: Config, params: dict[str, Any]) -> dict:
    """The base config as a {section: {key: value}} tree with the trial's values set like overrides."""
    tree = copy.deepcopy(config_to_dict(base))
    for key, value in params.items():
        _set_override(tree, key, value)
    return tree


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The config a trial trains with: `base` plus `params` ({dotted key: value}), validated."""
    return build_config(trial_tree(base, params))


def _check(base: Config, params: dict[str, Any], what: str) -> Config:
    try:
        return trial_config(base, params)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def check_space(base: Config, dims: list[Dimension]) -> list[Config]:
    """Build a trial config for every value of every dimension (both ends of a range), then for every
    combination of them (when there are at most MAX_CHECKED_COMBINATIONS). Returns the configs built last
    (combinations, or single values), so the caller can check sweep-level rules on them."""
    configs = []
    for dim in dims:
        for value in dim.values:
            configs.append(_check(base, {dim.key: value}, f"{_where(dim.key)}: {dim.kind} value {value!r}"))
    combinations = math.prod(len(d.values) for d in dims)
    if len(dims) < 2 or combinations > MAX_CHECKED_COMBINATIONS:
        return configs
    configs = []
    for values in itertools.product(*(d.values for d in dims)):
        params = dict(zip((d.key for d in dims), values))
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        configs.append(_check(base, params, f"tune.space: the combination {shown}"))
    return configs


def grid_size(dims: list[Dimension], num_samples: int) -> int:
    """How many trials Ray Tune will run: the grid's points times `num_samples`."""
    return math.prod(len(d.values) for d in dims if d.kind == "grid") * num_samples


def value_of(config: Config, key: str) -> Any:
    """The typed value of a dotted key in a resolved config (what a trial actually trained with)."""
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)
