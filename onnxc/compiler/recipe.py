"""From what the user typed (`-p` specs, a preset, a TOML recipe) to configured passes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxc.compiler.passes import Pass, create
from onnxc.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Each preset: the passes it runs (id, options) and the fidelity budget it verifies against.
# Canonicalization (constant folding, BN folding, Identity/Dropout removal) always runs.
# Budgets are relative L2 errors of the outputs against the original: a pass that leaves the
# budget is rolled back, so a preset never returns a model worse than its budget.
# balanced and aggressive are targets: the allocator spreads prune, svd, tucker and cluster over
# the layers by measured sensitivity to reach that fraction of the MACs inside the budget, and
# gives back the worst layers first (never a whole technique) when the model leaves it.
PRESETS: dict[str, dict[str, Any]] = {
    "lossless": {"passes": [], "max_error": 1e-5},
    "balanced": {"passes": [], "target": "macs=0.5", "max_error": 0.1},
    "aggressive": {"passes": [], "target": "macs=0.3", "max_error": 0.25},
}


@dataclass
class Recipe:
    passes: list[Pass] = field(default_factory=list)
    max_error: float | None = None
    seed: int | None = None
    target: str | None = None  # a preset's target (allocation), e.g. "macs=0.5"


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`name[:key=value[,key=value...]]` -> (name, {key: value})."""
    spec = spec.strip()
    if not spec:
        raise UsageError("empty pass spec")
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"pass spec '{spec}': expected key=value, got '{item}'")
        options[key.strip()] = value.strip()
    return name.strip(), options


def from_specs(specs: list[str]) -> list[Pass]:
    return [create(*parse_spec(s)) for s in specs]


def from_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (available: {', '.join(PRESETS)})")
    from onnxc.compiler.passes import available

    available()  # pass modules register their preset entries on import
    preset = PRESETS[name]
    return Recipe([create(pid, dict(opts)) for pid, opts in preset["passes"]], preset["max_error"],
                  target=preset.get("target"))


def from_toml(path: str | Path) -> Recipe:
    """A recipe file: top-level `preset`, `max_error`, `seed`, then `[[pass]]` tables with `name`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a valid TOML recipe ({exc})") from None
    known = {"preset", "max_error", "seed", "pass"}
    unknown = set(data) - known
    if unknown:
        raise UsageError(f"{path}: unknown keys {', '.join(sorted(unknown))} (valid: {', '.join(sorted(known))})")
    recipe = from_preset(data["preset"]) if "preset" in data else Recipe()
    for entry in data.get("pass", []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UsageError(f"{path}: every [[pass]] needs a name")
        options = {k: v for k, v in entry.items() if k != "name"}
        recipe.passes.append(create(str(entry["name"]), options))
    if "max_error" in data:
        recipe.max_error = float(data["max_error"])
    if "seed" in data:
        recipe.seed = int(data["seed"])
    return recipe


def build(specs: list[str] | None = None, preset: str | None = None, recipe_file: str | Path | None = None,
          ) -> Recipe:
    """Preset passes first, then the recipe file's, then `-p` specs, in that order."""
    recipe = from_preset(preset) if preset else Recipe()
    if recipe_file:
        extra = from_toml(recipe_file)
        recipe.passes.extend(extra.passes)
        recipe.max_error = extra.max_error if extra.max_error is not None else recipe.max_error
        recipe.seed = extra.seed
    recipe.passes.extend(from_specs(specs or []))
    return recipe
