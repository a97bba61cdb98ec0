"""The pass contract, the registry, and the PassManager that verifies and rolls back.

A pass is a dataclass of typed options with a stable `id`, registered with `@register`. Its
`run(model, ctx)` receives a canonical model it may modify in place (the manager hands it a
copy) and returns a `PassResult` that says honestly what changed: one `Change` per rewritten node
and one `Skip` per candidate left alone, with the reason. A pass never raises on a graph it does
not understand; it skips that part. The manager checks the model after each pass (onnx checker,
an onnxruntime session, fidelity against the original on held-out inputs) and rolls the pass
back when it breaks the model or leaves the `max_error` budget.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx

from onnxc.compiler import calibration as calib
from onnxc.compiler import runtime
from onnxc.compiler.canonical import canonicalize
from onnxc.compiler.cost import ModelCost, NodeCost, model_cost
from onnxc.compiler.executor import Executor, ExecutorError, InlineExecutor
from onnxc.compiler.model import clone
from onnxc.compiler.verify import Fidelity, Metric, compare_outputs
from onnxc.errors import OnnxcError, UsageError

log = logging.getLogger("onnxc.passes")

# The fidelity budget of `optimize` (passes and targets alike) when neither --max-error nor a
# preset or recipe sets one: a pass whose verified error leaves it is rolled back, so a model the
# verification shows destroyed is never written as a success. Stated in the report; --max-error
# changes it, --max-error inf removes it. A PassManager built directly has only its ctx.max_error.
DEFAULT_BUDGET = 0.25


@dataclass
class Change:
    """One rewritten node: what was done, why, its cost before/after and its local error."""

    node: str
    op: str
    action: str
    before: dict = field(default_factory=dict)  # {"params":, "macs":, "bytes":}
    after: dict = field(default_factory=dict)
    error: float | None = None  # local relative error of this layer's output (or weights)
    detail: dict = field(default_factory=dict)


@dataclass
class Skip:
    node: str
    reason: str


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # pass-specific summary (groups, ranks, ...)


def cost_dict(cost: NodeCost | ModelCost | None) -> dict:
    if cost is None:
        return {"params": 0, "macs": 0, "bytes": 0}
    return {"params": cost.params, "macs": cost.macs, "bytes": cost.bytes}


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration data, seed, budget, progress, and the
    executor that runs its per-layer work (in-process unless the user asked for workers)."""

    calibration: calib.Calibration | None = None
    seed: int = 0
    max_error: float | None = None
    progress: Callable[[str, int, int], None] = lambda label, done, total: None
    executor: Executor = field(default_factory=InlineExecutor)
    metric: Metric | None = None  # the user's error over the outputs (replaces the default fidelity)

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator that depends only on the seed and `salt` (reproducible per pass/layer)."""
        return np.random.default_rng([self.seed, *salt.encode()])

    def capture(self, model: onnx.ModelProto, names: Sequence[str], **kwargs) -> dict[str, np.ndarray]:
        """Intermediate tensors of `model` on the calibration (fitting) split."""
        if self.calibration is None:
            raise OnnxcError("this pass needs calibration inputs")
        return calib.capture(model, names, self.calibration.train, seed=self.seed, **kwargs)

    def cost_shapes(self) -> dict[str, list[int]] | None:
        """The input shapes per-sample costs are counted at (`Calibration.cost_shapes`): a dynamic
        dim read as 1 would count one position of a sequence. None without calibration data."""
        return self.calibration.cost_shapes() if self.calibration is not None else None


class Pass:
    """Base class: subclasses are dataclasses whose fields are their options."""

    id: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    option_help: ClassVar[dict[str, str]] = {}

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:  # pragma: no cover
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The typed options (fields starting with _ are internal state, e.g. the allocator's levels)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in option_fields(type(self))}

    def spec(self) -> str:
        """Every option: re-running this spec reproduces the pass exactly."""
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options().items())
        return f"{self.id}:{opts}" if opts else self.id

    def explicit_options(self) -> set[str]:
        """The options the user set: those given to `create` (a spec, a recipe, a preset), else
        those that differ from their defaults. A planner may change the others for its purpose
        (`Technique.planned`); an option set to its default value is still a choice."""
        given = getattr(self, "_given", None)
        if given is not None:
            return set(given)
        defaults = option_defaults(type(self)) if dataclasses.is_dataclass(self) else {}
        return {k for k, v in self.options().items() if k not in defaults or defaults[k] != v}

    def short_spec(self) -> str:
        """Only the options that differ from their defaults (for tables people read)."""
        defaults = option_defaults(type(self)) if dataclasses.is_dataclass(self) else {}
        opts = ",".join(f"{k}={_format_value(v)}" for k, v in self.options().items()
                        if k not in defaults or defaults[k] != v)
        return f"{self.id}:{opts}" if opts else self.id


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a dataclass pass available under its `id`."""
    if not dataclasses.is_dataclass(cls):
        cls = dataclass(cls)
    if not cls.id:
        raise TypeError(f"{cls.__name__} has no id")
    PASSES[cls.id] = cls
    return cls


def _load_builtin_passes() -> None:
    import onnxc.passes

    onnxc.passes.load_all()  # registers the built-in passes


def _import_pass_module(pass_id: str) -> bool:
    """Built-in pass `x` lives in `onnxc/passes/x.py`: import just that one (the CLI starts faster
    than when every technique's dependencies, tensorly and networkx among them, are loaded)."""
    if pass_id in PASSES:
        return True
    if not pass_id.isidentifier():
        return False
    import importlib

    try:
        importlib.import_module(f"onnxc.passes.{pass_id}")
    except ModuleNotFoundError as exc:
        if exc.name != f"onnxc.passes.{pass_id}":
            raise
        return False
    return pass_id in PASSES


def available() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(PASSES.items()))


def option_fields(cls: type[Pass]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def option_defaults(cls: type[Pass]) -> dict[str, Any]:
    """Each option's default value (None for an option without one)."""
    defaults = {}
    for f in option_fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = None
    return defaults


def create(pass_id: str, options: dict[str, Any] | None = None) -> Pass:
    """Instantiate a pass from its id and options (strings are converted to the field types)."""
    passes = PASSES if _import_pass_module(pass_id) else available()
    if pass_id not in passes:
        raise UsageError(f"unknown pass '{pass_id}' (available: {', '.join(passes)})")
    cls = passes[pass_id]
    fields = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise UsageError(f"pass '{pass_id}' has no option '{key}' (valid: {valid})")
        kwargs[key] = _coerce(pass_id, key, value, hints.get(key, str))
    try:
        instance = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"pass '{pass_id}': {exc}") from None
    validate = getattr(instance, "validate", None)
    if validate is not None:
        validate()
    # the options set (not a field: `replace` drops it, as a changed pass is no longer as given)
    object.__setattr__(instance, "_given", frozenset(kwargs))
    return instance


def _coerce(pass_id: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _coerce(pass_id, key, value, args[0]) if len(args) == 1 else _coerce_union(pass_id, key, value, args)
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split("|") if v]
        inner = args[0] if args else str
        return [_coerce(pass_id, key, v, inner) for v in items]
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise UsageError(f"pass '{pass_id}': {key} must be one of {', '.join(map(str, choices))}, got '{value}'")
        return value
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        return str(value) if hint is str else value
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise UsageError(f"pass '{pass_id}': option {key} expects {name}, got '{value}'") from None


def _coerce_union(pass_id: str, key: str, value: Any, args: list) -> Any:
    for hint in args:
        try:
            return _coerce(pass_id, key, value, hint)
        except UsageError:
            continue
    raise UsageError(f"pass '{pass_id}': option {key} cannot take '{value}'")


def _format_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "|".join(map(str, v))
    return str(v)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Node-name globbing for `exclude`/`layers` options."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# ---------------------------------------------------------------------------------------------
@dataclass
class PassRecord:
    """What happened to one pass in a PassManager run (goes into the report)."""

    id: str
    spec: str  # every option (reproducible)
    status: str  # "applied", "unchanged", "rolled back", "failed"
    reason: str = ""
    seconds: float = 0.0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    fidelity: dict | None = None
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    label: str = ""  # the options that differ from the defaults


class PassManager:
    """Run passes in order on a canonical model, verifying each and rolling back failures."""

    def __init__(self, passes: Sequence[Pass], ctx: PassContext, *,
                 input_shapes: dict[str, Sequence[int]] | None = None):
        self.passes = list(passes)
        self.ctx = ctx
        self.input_shapes = input_shapes

    def run(self, model: onnx.ModelProto, reference: onnx.ModelProto | None = None,
            reference_outputs: dict[str, np.ndarray] | None = None) -> tuple[onnx.ModelProto, list[PassRecord]]:
        """Fidelity is measured against `reference_outputs` on the validation inputs, or against
        the outputs of `reference` (default: `model`)."""
        reference = reference if reference is not None else model
        val = self.ctx.calibration.validation if self.ctx.calibration else None
        ref_out = reference_outputs
        if ref_out is None and val is not None:
            ref_out = self._outputs(reference, val)
        records = []
        current = model
        self.last_outputs: dict[str, np.ndarray] | None = None  # outputs of `current` on validation
        cost_at = self.ctx.cost_shapes()
        cost = model_cost(current, cost_at)
        for index, p in enumerate(self.passes):
            self.ctx.progress("passes", index, len(self.passes))
            log.info("running %s", p.spec())
            before = cost
            start = time.perf_counter()
            record = PassRecord(p.id, p.spec(), "applied", before=before.totals(), label=p.short_spec())
            try:
                result = p.run(clone(current), self.ctx)
            except (UsageError, ExecutorError):
                raise
            except Exception as exc:  # a bug in a pass must not lose the user's model
                log.debug("pass %s crashed", p.id, exc_info=True)
                record.status, record.reason = "failed", f"pass raised {type(exc).__name__}: {exc}"
                record.seconds = time.perf_counter() - start
                records.append(record)
                continue
            record.changes, record.skipped, record.info = result.changes, result.skipped, result.info
            if not result.modified:
                record.status, record.after = "unchanged", before.totals()
                record.seconds = time.perf_counter() - start
                records.append(record)
                continue
            candidate = canonicalize(result.model, self.input_shapes)
            problem, fidelity, outputs = self._check(candidate, ref_out, val)
            record.seconds = time.perf_counter() - start
            if fidelity is not None:
                record.fidelity = fidelity.to_dict()
            if problem:
                record.status, record.reason = "rolled back", problem
                record.after = before.totals()
                log.warning("%s rolled back: %s", p.id, problem)
            else:
                current, self.last_outputs = candidate, outputs
                cost = model_cost(current, cost_at)
                record.after = cost.totals()
            records.append(record)
        self.ctx.progress("passes", len(self.passes), len(self.passes))
        return current, records

    def _outputs(self, model: onnx.ModelProto, inputs: dict[str, np.ndarray],
                 progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
        return runtime.run(model, inputs, progress=progress)

    def _check(self, candidate: onnx.ModelProto, ref_out, val) -> tuple[str, Fidelity | None, dict | None]:
        """(problem or "", fidelity, the candidate's outputs on the validation inputs)."""
        try:
            onnx.checker.check_model(candidate)
        except Exception as exc:
            return f"invalid model: {str(exc).splitlines()[0]}", None, None
        if ref_out is None:
            return "", None, None
        try:
            got = self._outputs(candidate, val, progress=lambda d, t: self.ctx.progress("verification", d, t))
            fidelity = compare_outputs(ref_out, got, self.ctx.metric)
        except UsageError:
            raise
        except OnnxcError as exc:
            return str(exc), None, None
        except Exception as exc:
            return f"onnxruntime failed: {str(exc).splitlines()[0]}", None, None
        if not np.isfinite(fidelity.rel_l2):
            return "outputs are not finite", fidelity, None
        if self.ctx.max_error is not None and fidelity.error > self.ctx.max_error:
            return (f"error {fidelity.error:.4g} exceeds the budget {self.ctx.max_error:g}", fidelity, None)
        return "", fidelity, got
