"""Measured costs kept on disk per model and machine (`~/.cache/duospec/profiles`), spot-checked when
read and never written from a measurement taken under visible load (corrections.py, load.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from duospec.budget.corrections import spot_check_agrees
from duospec.budget.load import LoadProbe, under_load
from duospec.budget.model import CostProfile
from duospec.budget.timing import measure_draft_step, measure_growing_costs, measure_target_costs
from duospec.models.base import Model

DEFAULT_TARGET_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 33)


def profiles_dir() -> Path:
    """Where measured costs are kept between runs (`duospec profile` refreshes them)."""
    from duospec.models.registry import cache_root

    return cache_root() / "profiles"


@dataclass(frozen=True)
class Measured:
    """A fresh measurement and whether it ran under visible load (then it serves this run, unkept)."""

    value: object
    under_load: bool = False


def cached_measurement(
    key_parts: list[str] | None,
    measure: Callable[[], object],
    remeasure: bool = False,
    spot_check: Callable[[object], bool] | None = None,
    notify: Callable[[str], None] | None = None,
) -> object:
    """A JSON-able measurement from the disk cache when its key matches, else measured and stored.

    key_parts identify model, dtype, device, threads and versions; None (in-memory test models)
    skips the disk cache. A damaged or unwritable cache only costs a re-measurement.
    measure: returns the value, or a `Measured` whose `under_load` keeps it off the disk (it is still
    returned for this run; `notify` says so). spot_check: given a kept value, False means it is wrong
    here and is measured again (and replaced unless that measurement is under load).
    """
    path = _cache_path(key_parts)
    kept = _read_kept(path) if path is not None and not remeasure else None
    if kept is not None and (spot_check is None or spot_check(kept)):
        return kept
    measured = measure()
    value, loaded = (measured.value, measured.under_load) if isinstance(measured, Measured) else (measured, False)
    if path is not None and loaded:
        if notify is not None:
            notify("measured under visible load (CPU busy): the figure serves this run but is not kept on disk")
    elif path is not None:
        keep_measurement(key_parts, value)
    return value


def keep_measurement(key_parts: list[str] | None, value: object) -> bool:
    """Write a measurement where `cached_measurement` reads it; False when there is no key or the
    cache is unwritable (that only costs a re-measurement next run)."""
    path = _cache_path(key_parts)
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key_parts, "value": value}, indent=1))
    except OSError:
        return False
    return True


def read_measurement(key_parts: list[str] | None) -> object | None:
    """The figure kept on disk under this key, or None (no key, nothing kept, a damaged file)."""
    path = _cache_path(key_parts)
    return None if path is None else _read_kept(path)


def _cache_path(key_parts: list[str] | None) -> Path | None:
    if not key_parts:
        return None
    digest = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:16]
    return profiles_dir() / f"{digest}.json"


def _read_kept(path: Path) -> object | None:
    """The kept value, or None when there is none or the file is damaged."""
    try:
        return json.loads(path.read_text())["value"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def target_cost_key(key_parts: list[str] | None) -> list[str] | None:
    """The cache key of a model's target curve (None: not kept)."""
    return key_parts and [*key_parts, "target", *map(str, DEFAULT_TARGET_SIZES)]


def draft_step_key(key_parts: list[str] | None) -> list[str] | None:
    """The cache key of a model's draft step (None: not kept)."""
    return key_parts and [*key_parts, "draft-step"]


def target_costs_for(
    model: Model,
    key_parts: list[str] | None,
    remeasure: bool = False,
    probe: LoadProbe | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """Measured (or cached and spot-checked) target pass costs for the sizes the budget considers.

    The spot check times one-token passes and compares them with the kept curve's t(1).
    """
    probe = probe or LoadProbe()
    notify = notify or _silent

    def measure() -> Measured:
        costs, reading = probe.watch(lambda: measure_target_costs(model, DEFAULT_TARGET_SIZES), model)
        return Measured({str(n): s for n, s in costs.items()}, under_load(reading))

    def spot_check(kept: object) -> bool:
        one_token = CostProfile({int(n): float(s) for n, s in kept.items()}).target_pass(1)
        return spot_check_agrees(model, one_token, probe, notify, "target pass")

    value = cached_measurement(target_cost_key(key_parts), measure, remeasure, spot_check, notify)
    return {int(n): float(s) for n, s in value.items()}


def draft_step_for(
    model: Model,
    key_parts: list[str] | None,
    remeasure: bool = False,
    probe: LoadProbe | None = None,
    notify: Callable[[str], None] | None = None,
) -> float:
    """Measured (or cached and spot-checked) seconds of one draft step."""
    probe = probe or LoadProbe()
    notify = notify or _silent

    def measure() -> Measured:
        step, reading = probe.watch(lambda: measure_draft_step(model), model)
        return Measured(step, under_load(reading))

    def spot_check(kept: object) -> bool:
        return spot_check_agrees(model, float(kept), probe, notify, "draft step")

    return float(cached_measurement(draft_step_key(key_parts), measure, remeasure, spot_check, notify))


def growing_costs_for(
    model: Model,
    key_parts: list[str] | None,
    sizes: tuple[int, ...],
    ceiling: float,
    what: str,
    remeasure: bool = False,
    probe: LoadProbe | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """`measure_growing_costs`, kept on disk under the model's key (None: measured every run)."""
    probe = probe or LoadProbe()

    def measure() -> Measured:
        costs, reading = probe.watch(lambda: measure_growing_costs(model, sizes, ceiling), model)
        return Measured({str(n): s for n, s in costs.items()}, under_load(reading))

    key = key_parts and [*key_parts, what, *map(str, sizes), f"ceiling={ceiling:.4f}"]
    value = cached_measurement(key, measure, remeasure, None, notify or _silent)
    return {int(n): float(s) for n, s in value.items()}


def _silent(message: str) -> None:
    """The default `notify`: say nothing."""
