"""Judging a refit on calibration samples it was not fitted on, and falling back where it fails.

Every refit (prune's ridge least squares, factorizations fitted to data, clustering's bias
correction) is fitted to `Calibration.train`. Its in-sample error says little: a layer with many
inputs and few samples fits its samples at any error it likes. So each refit is compared with
the unrefitted alternative (prune: the sliced weights; svd/tucker/cp: the factors without the
data refit; cluster: no bias correction) on `Calibration.validation`, twice:

- locally, per layer, by `choose`: the layer's output error on held-out samples, computed from
  the same kind of statistics the fit used (so it costs one more pass of those samples, not a
  model run per layer);
- at the model's outputs, per pass, by `judge_model`: the rewritten model with the refits and
  the same model without them, both against the reference on the fitting and held-out samples
  (the user metric if given, else verification's error).

The refit is kept only where its held-out error is not worse; the report shows the in-sample
and held-out errors of both side by side (`Verdict.detail`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxc.compiler import memo, runtime
from onnxc.compiler.model import fingerprint
from onnxc.compiler.samples import Samples
from onnxc.compiler.samples import fingerprint as data_fingerprint
from onnxc.compiler.verify import Metric, compare_outputs


@dataclass
class Errors:
    """One candidate's relative error on the samples it was fitted to and on held-out ones."""

    fit: float | None
    held_out: float | None


@dataclass
class Verdict:
    """The refit against the unrefitted alternative, and which one was kept."""

    refit: Errors
    plain: Errors
    kept: bool

    def detail(self, prefix: str = "") -> dict:
        """Report fields: in-sample and held-out error of both, side by side."""
        return {f"{prefix}error_fit": self.refit.fit, f"{prefix}error_held_out": self.refit.held_out,
                f"{prefix}unrefitted_fit": self.plain.fit, f"{prefix}unrefitted_held_out": self.plain.held_out,
                f"{prefix}refit": "kept" if self.kept else "fell back"}


def choose(refit: Errors, plain: Errors) -> Verdict:
    """Keep the refit when it is not worse on held-out samples (in-sample when none are held out)."""
    a, b = (refit.held_out, plain.held_out) if refit.held_out is not None and plain.held_out is not None \
        else (refit.fit, plain.fit)
    kept = a is not None and b is not None and np.isfinite(a) and a <= b
    return Verdict(refit, plain, bool(kept))


def has_held_out(calibration) -> bool:
    """Whether the calibration keeps samples apart from the ones passes fit to."""
    return calibration is not None and calibration.validation is not calibration.train


def in_sample(train, validation) -> Samples:
    """The first fitting samples, as many as are held out: the in-sample error weighs as many
    samples as the held-out one, at a third of the cost of all of them on a 3:1 split (a 3 GMAC
    detector runs 1-2 s per page here)."""
    train = Samples.of(train)
    return train.subset(range(min(train.count, Samples.of(validation).count)))


class Reference:
    """The reference model's outputs on both calibration splits, computed once per pass (the
    fitting split as `in_sample` takes it: judging a pass runs each candidate on it twice).

    Inside the sensitivity sweep the outputs are kept for the next probe (`memo`): every probe
    judges against the same original model on the same samples."""

    def __init__(self, reference: onnx.ModelProto, calibration, metric: Metric | None = None):
        self.calibration, self.metric = calibration, metric
        held = has_held_out(calibration)
        self.train = in_sample(calibration.train, calibration.validation) if held else calibration.train
        key = (fingerprint(reference), data_fingerprint(self.train),
               data_fingerprint(calibration.validation) if held else None) if memo.active() else None
        outputs = memo.get("reference", key) if key is not None else None
        if outputs is None:
            memo.drop("reference")
            outputs = (runtime.run(reference, self.train),
                       runtime.run(reference, calibration.validation) if held else None)
            memo.put("reference", key, outputs)
        self.fit, self.held = outputs

    def errors(self, model: onnx.ModelProto) -> Errors:
        """The model's output error on the fitting samples and on the held-out ones."""
        def error(ref: Mapping | None, data) -> float | None:
            if ref is None:
                return None
            value = compare_outputs(ref, runtime.run(model, data), self.metric).error
            return float(value) if np.isfinite(value) else float("inf")
        return Errors(error(self.fit, self.train), error(self.held, self.calibration.validation))


def judge_model(reference: Reference, refit: onnx.ModelProto, plain: onnx.ModelProto) -> Verdict:
    """The pass's refits judged at the model's outputs against its unrefitted rewrite."""
    return choose(reference.errors(refit), reference.errors(plain))
