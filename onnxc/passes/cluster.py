"""Weight clustering (Deep Compression's weight sharing): per-layer k-means codebooks.

Every large float weight of a Conv, ConvTranspose, Gemm or MatMul is replaced by 2^bits (or
fewer) shared values and one small integer code per weight, so the file shrinks ~32/bits times.
The 1-D k-means (`_kmeans1d`) works on the sorted weights or their fine histogram, so even a
4096x4096 layer clusters in about a second. With real calibration data each weight's squared
error is weighted by the second moment of the input it multiplies (`data_aware`): an error on a
weight fed by a large activation costs more at the output; and the mean output shift the
clustering causes, E[dW x] = dW E[x], is folded into the bias (`bias_correction`), after which
only the input's variance matters for the weighting. Exact zeros (pruned weights) keep an exact
0.0 code. The report gives, per layer, the weight error, bytes before/after and the size
the codes would take Huffman-coded (Deep Compression's third stage).

Clustered weight pattern (a contract: the C backend reads it)
-------------------------------------------------------------
The weight initializer `W` is removed and the same name becomes the output of::

    idx = Cast(codes, to=INT32)
    idx = Add(idx, row_offsets)              # per_channel only
    W   = Gather(codebook, idx, axis=0)

- `codebook`: initializer of W's float type (float32 in practice), 1-D: `[K]`, or per channel
  `[C*K]` where channel c owns `codebook[c*K:(c+1)*K]`. Entries ascend (per channel). When W
  (the channel) had exact zeros, one entry is exactly 0.0 and those weights use it.
- `codes`: initializer with W's shape: UINT4 when bits <= 4 (K <= 16; raw_data holds two codes
  per byte, low nibble first: element i of the flattened W is byte i // 2, bits 0-3 if i is
  even, 4-7 if odd), else UINT8 (bits 5-8). UINT4 needs IR >= 10 and default-domain opset >= 21: the pass raises the
  model's opset to 21 (and IR to 10) when every op keeps its meaning there (see
  `_codes.upgrade_for_uint4`), else uses the fallback below.
- `row_offsets` (per_channel): INT32 initializer holding c*K along the channel axis, shaped
  `[C, 1, ..., 1]` when the channel axis is 0 (Conv, ConvTranspose, Gemm with transB=1: every
  canonical Gemm) and `[1, ..., 1, C]` when it is the last (Gemm with transB=0, MatMul).

Fallback for K <= 16 when the opset cannot be raised (or `packing=nibbles`): `codes` is a
UINT8 initializer of shape `[N // 2, 1]` holding exactly the UINT4 bytes above (N = W's element
count), unpacked in the graph with ops valid since opset 7::

    b    = Cast(codes, to=INT32)
    hi   = Div(b, sixteen)                   # sixteen: INT32 scalar 16
    lo   = Sub(b, Mul(hi, sixteen))
    flat = Reshape(Concat(lo, hi, axis=1), [-1])
    flat = Concat(flat, tail, axis=0)        # only when N is odd: tail is INT32 [1], the last code
    idx  = Reshape(flat, shape_of_W)

followed by the same optional Add and the Gather.

`packing=tight` (opt-in) stores 1-3 and 5-7 bit codes at exactly `bits` bits: a little-endian
bit stream (code i in stream bits [i*bits, (i+1)*bits); for 4 bits these are the UINT4 bytes)
held as a UINT8 initializer `codes` of shape [N // 8, bits] (8 codes per row), unpacked with::

    B     = Cast(codes, to=INT32)                       # [M, bits]
    pair  = Add(Gather(B, jlo, axis=1), Mul(Gather(B, jhi, axis=1), hscale))    # [M, 8]
    s     = Div(pair, shift)
    code  = Sub(s, Mul(Div(s, modulus), modulus))       # modulus: INT32 scalar 2^bits
    flat  = Reshape(code, [-1]); flat = Concat(flat, tail, axis=0)   # tail: the N % 8 last codes
    idx   = Reshape(flat, shape_of_W)

where, for code position p = 0..7 of a row, jlo[p] = p*bits // 8, jhi[p] = min(jlo[p]+1, bits-1),
hscale[p] = 256 if jlo[p]+1 < bits else 0 and shift[p] = 2^(p*bits % 8) ([8] constants).
4-bit and 8-bit codes keep the containers above. `_codes.read_clustered(model)` decodes every form.
Canonicalization never folds Cast/Gather/Add of constants, so the pattern survives the
PassManager; onnxruntime folds it back to a dense weight at session start (the file shrinks,
not the runtime memory). Bias correction may give a Conv/Gemm that had none a bias input, or
change the constant of the Add after a MatMul.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx

from onnxc.compiler import calibration as calib
from onnxc.compiler import holdout, runtime
from onnxc.compiler.cost import model_cost
from onnxc.compiler.graph import GraphView, attr
from onnxc.compiler.linear import FLOAT_TYPES, stored_to_bias, weight_out_axis
from onnxc.compiler.model import clone, tensor_bytes
from onnxc.compiler.passes import Change, Pass, PassContext, PassResult, Skip, cost_dict, matches_any, register
from onnxc.compiler.samples import Samples
from onnxc.compiler.technique import Candidate, Technique
from onnxc.errors import UsageError
from onnxc.passes import _codes
from onnxc.passes._kmeans1d import INITS, kmeans1d

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
IMPORTANCE_FLOOR = 0.01  # every weight keeps this share of the mean importance


@dataclass
class _Target:
    """One weight initializer and the nodes that consume it as their weight."""

    weight: str
    nodes: list[onnx.NodeProto]
    channel_axis: int  # axis of W holding output channels (rows of per-channel codebooks)


# Levels offered to the allocator: code bits, mildest first.
LEVELS = (8, 6, 4)


@register
@dataclass
class ClusterPass(Pass, Technique):
    id = "cluster"
    plan_order = 90  # storage: after every structural rewrite
    saves = frozenset({"size"})  # onnxruntime decodes the codes to a dense weight at session start
    slot = "storage"  # codes of whatever weight the layer has by then
    planned_by_default = True
    summary = "k-means weight sharing: per-layer codebooks and 1-8 bit codes stored compactly"
    uses_calibration = True
    option_help = {
        "bits": "code width: 2^bits shared values per codebook (1-8)",
        "per_channel": "one codebook per output channel instead of per layer",
        "min_size": "leave weights with fewer elements alone (biases, tiny layers)",
        "exclude": "node-name globs to leave alone (a|b)",
        "init": "centroids start: linear (Deep Compression), density (quantiles), kmeans++ (seeded), "
                "companded (density^(1/3) spacing)",
        "data_aware": "weight each weight's error by its input's second moment, the variance with bias_correction "
                      "(real calibration data only)",
        "keep_zero": "give exact zeros (pruned weights) an exact 0.0 code",
        "packing": "code storage: auto (UINT4 if the opset can go to 21, else packed bytes; UINT8 above 4 "
                   "bits), uint4 (or skip), nibbles (packed bytes), tight (a bit stream at exactly `bits`)",
        "max_iter": "Lloyd iterations per codebook",
        "bias_correction": "fold the mean output shift dW*E(x) into the bias (calibration data only)",
        "recapture": "with bias_correction, correct layer by layer from the clustered model's own activations "
                     "to the original layer outputs instead of once from the original's (slower; experimental, "
                     "so off: compare it with the default on held-out data before relying on it)",
    }
    bits: int = 8
    per_channel: bool = False
    min_size: int = 1024
    exclude: list[str] = field(default_factory=list)
    init: Literal["linear", "density", "kmeans++", "companded"] = "linear"
    data_aware: bool = True
    keep_zero: bool = True
    packing: Literal["auto", "uint4", "nibbles", "tight"] = "auto"
    bias_correction: bool = True
    recapture: bool = False
    max_iter: int = 300
    # Set by the allocator (not a CLI option): only the weights of these node names are clustered.
    _layers: set[str] | None = None

    def candidates(self, model: onnx.ModelProto) -> list[_Target]:
        """The weights this pass may cluster in `model`."""
        return self._targets(GraphView(model.graph))[0]

    # ---- the Technique protocol ----------------------------------------------------------------
    def plan_candidates(self, model: onnx.ModelProto, shapes: dict | None = None) -> list[Candidate]:
        return [Candidate(t.nodes[0].name, tuple(n.name for n in t.nodes)) for t in self.candidates(model)]

    def levels(self, target_ratio: float | None = None) -> tuple[float, ...]:
        return LEVELS

    def restricted(self, levels) -> list[Pass]:
        """One run per code width, widest first, each over the layers planned at it."""
        return [replace(self, bits=int(bits), _layers={n for n, b in levels.items() if b == bits})
                for bits in sorted(set(levels.values()), reverse=True)]

    def planned(self, explicit, kind=None) -> ClusterPass:
        """5-7 bit codes stored at their width: in whole bytes they would save nothing over 8 bits."""
        return replace(self, packing="tight") if self.packing == "auto" else self

    def validate(self) -> None:
        if not 1 <= self.bits <= 8:
            raise UsageError(f"pass 'cluster': bits must be between 1 and 8, got {self.bits}")
        if self.min_size < 1:
            raise UsageError(f"pass 'cluster': min_size must be >= 1, got {self.min_size}")
        if self.init not in INITS:
            raise UsageError(f"pass 'cluster': init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.max_iter < 1:
            raise UsageError(f"pass 'cluster': max_iter must be >= 1, got {self.max_iter}")

    # ---- driver ------------------------------------------------------------------------------
    def run(self, model: onnx.ModelProto, ctx: PassContext) -> PassResult:
        self.validate()
        view = GraphView(model.graph)
        targets, skipped = self._targets(view)
        result = PassResult(model, False, skipped=skipped)
        if not targets:
            return result
        costs = model_cost(model, ctx.cost_shapes()).by_name()
        original = clone(model) if self.bias_correction else None
        stats = self._input_stats(model, targets, ctx)
        held = self._input_stats(model, targets, ctx, ctx.calibration.validation) \
            if self.bias_correction and stats and holdout.has_held_out(ctx.calibration) else {}
        corrections: list[tuple[_Target, np.ndarray, Change]] = []
        importance = self._importance(view, targets, stats)
        bytes_before = tensor_bytes(model)
        tight = self.packing == "tight" and self.bits not in (4, 8)
        container4, opset_note = self._container4(model) if self.bits <= 4 else ("", "")
        container = "tight" if tight else container4 if self.bits <= 4 else "uint8"
        fallback = container4 if self.bits < 4 else "uint8"  # where tight packing would not pay
        removed: set[str] = set()
        new_nodes: list[onnx.NodeProto] = []
        shared = _codes.SharedConstants(view)
        chosen: list[_codes.Encoded] = []
        totals = {"weight_bytes_before": 0, "weight_bytes_after": 0, "huffman_code_bytes": 0, "code_bytes": 0}
        weights = {t.weight: view.const(t.weight) for t in targets}
        fits = self._cluster_all(targets, weights, importance, ctx) if container else {}
        for target in targets:
            weight = weights[target.weight]
            if not np.all(np.isfinite(weight)):
                result.skipped.append(Skip(target.nodes[0].name, "weight has non-finite values"))
                continue
            if not container:
                result.skipped.append(Skip(target.nodes[0].name, opset_note))
                continue
            codebook, codes, offsets, fit = fits[target.weight]
            enc = self._encode(view, target, codes, codebook, offsets, container, fallback, shared)
            if enc.nbytes >= weight.nbytes:
                result.skipped.append(Skip(target.nodes[0].name, f"codes and codebooks ({enc.nbytes} B) would not "
                                           f"be smaller than the weight ({weight.nbytes} B)"))
                continue
            rebuilt = _rebuild(codebook, codes, target.channel_axis if self.per_channel else None)
            change = self._change(target, weight, rebuilt, codebook, enc, fit, costs)
            if self.bias_correction and stats:
                corrections.append((target, rebuilt.astype(np.float64) - weight, change))
            new_nodes.extend(enc.nodes)
            chosen.append(enc)
            model.graph.initializer.extend(enc.initializers)
            removed.add(target.weight)
            result.changes.append(change)
            for key in ("weight_bytes_before", "weight_bytes_after", "huffman_code_bytes", "code_bytes"):
                totals[key] += change.detail[key.replace("weight_", "")]
        if not result.changes:
            return result

        def finish(m: onnx.ModelProto) -> onnx.ModelProto:
            """The codes' nodes and constants in, the dense weights out."""
            if any(e.container == "uint4" for e in chosen):
                _codes.upgrade_for_uint4(m)  # checked safe by _container4
            m.graph.initializer.extend(shared.used_by(chosen))
            for i in reversed(range(len(m.graph.initializer))):
                if m.graph.initializer[i].name in removed:
                    del m.graph.initializer[i]
            nodes = new_nodes + list(m.graph.node)
            del m.graph.node[:]
            m.graph.node.extend(nodes)
            return m

        model = finish(model)
        plain = clone(model) if held and corrections else None
        view = GraphView(model.graph)
        if corrections and self.recapture:
            _recapture_biases(original, model, [(t.nodes, c) for t, _, c in corrections], ctx)
        for target, delta, change in [] if self.recapture else corrections:
            verdicts = self._correct_bias(view, target, delta, stats, held, weights[target.weight])
            change.detail["bias_corrected"] = any(v.kept for v in verdicts)
            if len(verdicts) == 1:
                change.detail.update(verdicts[0].detail())
        if plain is not None and any(c.detail.get("bias_corrected") for _, _, c in corrections):
            verdict = holdout.judge_model(holdout.Reference(original, ctx.calibration, ctx.metric), model, plain)
            result.info["model_refit"] = verdict.detail()
            if not verdict.kept:  # the corrections do not generalize at the model's outputs
                model = plain
                for _, _, change in corrections:
                    change.detail["bias_corrected"] = False
                    if "refit" in change.detail:
                        change.detail["refit"] = "fell back"
        result.model = model
        result.modified = True
        after = tensor_bytes(model)
        result.info = {
            **result.info, "layers": len(result.changes), "bits": self.bits, "per_channel": self.per_channel,
            "init": self.init, "data_aware": bool(importance),
            **totals,
            "huffman_bytes": totals["weight_bytes_after"] - totals["code_bytes"] + totals["huffman_code_bytes"],
            "model_tensor_bytes_before": bytes_before, "model_tensor_bytes_after": after,
            "compression": round(bytes_before / after, 3) if after else None,
        }
        if not any(e.container in ("uint4", "nibbles") for e in chosen):
            opset_note = ""
        if opset_note:
            result.info["codes_4bit"] = opset_note
        return result

    def _encode(self, view: GraphView, target: _Target, codes: np.ndarray, codebook: np.ndarray,
                offsets: np.ndarray | None, container: str, fallback: str,
                shared: _codes.SharedConstants) -> _codes.Encoded:
        """The pattern for one weight; a tight bit stream only where it beats the byte containers
        in the file (tiny layers pay more for the unpack nodes than they save)."""
        args = (target.weight, codes, codebook.reshape(-1), offsets)
        if container == "tight":
            # Trial encodings with names that are not reserved, so the loser leaves no trace.
            trial = _TrialNames(view)
            scratch = _codes.SharedConstants(trial)
            sizes = [_codes.encode(trial, *args, c, target.weight, bits=self.bits, shared=scratch).serialized_size()
                     for c in (container, fallback)]
            container = container if sizes[0] < sizes[1] else fallback
        return _codes.encode(view, *args, container, target.weight, bits=self.bits, shared=shared)

    def _container4(self, model: onnx.ModelProto) -> tuple[str, str]:
        """Where 4-bit codes go: UINT4 after a safe opset upgrade, else packed bytes."""
        if self.packing == "nibbles":
            return "nibbles", "packed two per UINT8 byte (packing=nibbles)"
        old = _codes.default_opset(model)
        reason = _codes.upgrade_for_uint4(model, check_only=True)
        if not reason:
            new = max(old, _codes.UINT4_OPSET)
            return "uint4", f"UINT4 (opset {old} -> {new})" if old < new else "UINT4"
        if self.packing == "uint4":
            return "", f"UINT4 impossible: opset {old} cannot be raised to 21 ({reason})"
        return "nibbles", f"packed two per UINT8 byte: opset {old} kept ({reason})"

    # ---- which weights ------------------------------------------------------------------------
    def _targets(self, view: GraphView) -> tuple[list[_Target], list[Skip]]:
        by_weight: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        skipped: list[Skip] = []
        for node in view.graph.node:
            if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            if self._layers is not None and node.name not in self._layers:
                continue
            slot = _weight_slot(node, view)
            if slot is None:
                continue
            name = node.input[slot]
            tensor = view.initializers[name]
            if tensor.data_type not in FLOAT_TYPES:
                skipped.append(Skip(node.name, f"weight {name} is not float"))
                continue
            if math.prod(tensor.dims) < self.min_size:
                skipped.append(Skip(node.name, f"weight has {math.prod(tensor.dims)} elements < min_size"))
                continue
            by_weight.setdefault(name, []).append((node, slot))
        targets = []
        for name, uses in by_weight.items():
            nodes = [n for n, _ in uses]
            excluded = [n.name for n in nodes if matches_any(n.name, self.exclude)]
            if excluded:
                skipped.extend(Skip(n, "excluded") for n in excluded)
                continue
            others = [c for c in view.consumers.get(name, []) if all(c is not n for n in nodes)]
            if others or name in view.graph_outputs or any(list(n.input).count(name) > 1 for n in nodes):
                why = f"also read by {others[0].op_type} '{others[0].name}'" if others else "not only a weight"
                skipped.append(Skip(nodes[0].name, f"weight {name} {why}"))
                continue
            # the weight's output-channel axis (rows of per-channel codebooks)
            axes = {weight_out_axis(n, len(view.initializers[name].dims)) for n, _ in uses}
            targets.append(_Target(name, nodes, axes.pop() if len(axes) == 1 else 0))
        return targets, skipped

    # ---- calibration statistics ----------------------------------------------------------------
    def _input_stats(self, model: onnx.ModelProto, targets: list[_Target], ctx: PassContext, data=None,
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per consumer node: mean and mean square of each input channel on `data` (default: the
        calibration's fitting samples)."""
        cal = ctx.calibration
        if not (self.data_aware or self.bias_correction) or cal is None or cal.is_random:
            return {}
        data = cal.train if data is None else data
        wanted = {}
        for t in targets:
            for node in t.nodes:
                if node.input and node.input[0]:
                    wanted[_key(node)] = (node, node.input[0])
        names = sorted({x for _, x in wanted.values()})
        sums: dict[str, list] = {}
        graph_inputs = {n for n in names if n in data}
        computed = [n for n in names if n not in graph_inputs]
        batches = calib.iter_activations(model, computed, data) if computed else iter(())
        for batch in itertools.chain([{n: data[n] for n in graph_inputs}], batches):  # streamed, never listed
            for key, (node, x) in wanted.items():
                if x in batch:
                    moments = _channel_moments(node, batch[x])
                    acc = sums.setdefault(key, [0.0, 0.0, 0])
                    for i, m in enumerate(moments):
                        acc[i] = acc[i] + m
        return {k: (s1 / n, s2 / n) for k, (s1, s2, n) in sums.items() if n}

    def _importance(self, view: GraphView, targets: list[_Target],
                    stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Per-weight importance (broadcastable to W) from the statistics of the input it multiplies.

        The output error of a weight error dW is E[(dW x)^2]: the mean square of x weighs it, or
        only the variance when bias correction removes the part the mean carries.
        """
        if not self.data_aware or not stats:
            return {}
        out: dict[str, np.ndarray] = {}
        for t in targets:
            shape = tuple(view.initializers[t.weight].dims)
            total = None
            for node in t.nodes:
                if _key(node) not in stats:
                    continue
                mean, sq = stats[_key(node)]
                channel = np.maximum(sq - mean * mean, 0.0) if self.bias_correction else sq
                imp = _expand_channels(node, channel, shape)
                if imp is not None:
                    total = imp if total is None else total + imp
            if total is not None and np.all(np.isfinite(total)) and total.mean() > 0:
                out[t.weight] = total / total.mean() + IMPORTANCE_FLOOR
        return out

    def _correct_bias(self, view: GraphView, target: _Target, delta: np.ndarray,
                      stats: dict[str, tuple[np.ndarray, np.ndarray]],
                      held: dict[str, tuple[np.ndarray, np.ndarray]], weight: np.ndarray) -> list[holdout.Verdict]:
        """Absorb the mean output shift E[dW x] = dW E[x] of each consumer into its bias, where it
        also lowers the error on held-out samples (one verdict per consumer corrected or judged)."""
        verdicts = []
        for node in (view.producers[n.output[0]] for n in target.nodes):
            if _key(node) not in stats:
                continue
            mean = _expand_channels(node, stats[_key(node)][0], delta.shape)
            if mean is None:
                continue
            shift = _output_shift(node, delta, mean)
            if shift is None:
                continue
            verdict = _bias_verdict(node, weight, delta, shift, stats[_key(node)], held.get(_key(node)))
            if verdict.kept and not _add_to_bias(view, node, -shift):
                continue  # no bias this node could carry: neither corrected nor judged
            verdicts.append(verdict)
        return verdicts

    # ---- clustering one weight -----------------------------------------------------------------
    def _cluster_all(self, targets: list[_Target], weights: dict[str, np.ndarray],
                     importance: dict[str, np.ndarray], ctx: PassContext) -> dict[str, tuple]:
        """The k-means of every finite weight, on the executor (weights and importance shared once;
        each weight's seed comes from its name)."""
        todo = [t for t in targets if np.all(np.isfinite(weights[t.weight]))]
        if not todo:
            return {}
        executor = ctx.executor
        shared = {"weights": executor.put({t.weight: weights[t.weight] for t in todo}),
                  "importance": executor.put(importance)}
        items = [(self, t.weight, t.channel_axis, ctx.seed) for t in todo]
        fits = executor.map(_cluster_task, items, shared=shared, label="cluster: fits", progress=ctx.progress)
        return {t.weight: fit for t, fit in zip(todo, fits)}

    def _cluster(self, weight: np.ndarray, channel_axis: int, importance: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
        """Codebook [R, K], codes (W's shape), row offsets (per channel) and fit statistics."""
        w32 = weight.astype(np.float32, copy=False)
        axis = channel_axis if self.per_channel else None
        if axis is None:
            rows = w32.reshape(1, -1)
            imp = None if importance is None else np.broadcast_to(importance, w32.shape).reshape(1, -1)
        else:
            rows = np.moveaxis(w32, axis, 0).reshape(w32.shape[axis], -1)
            imp = None if importance is None else np.moveaxis(np.broadcast_to(importance, w32.shape),
                                                              axis, 0).reshape(rows.shape)
        km = kmeans1d(rows, 1 << self.bits, weights=imp, init=self.init, rng=rng, max_iter=self.max_iter,
                      keep_zero=self.keep_zero)
        codebook, codes, counts = _compact(km.centroids, km.codes, km.counts)
        if axis is None:
            codes_w = codes.reshape(w32.shape)
            offsets = None
        else:
            moved = (w32.shape[axis],) + tuple(np.delete(np.array(w32.shape), axis))
            codes_w = np.moveaxis(codes.reshape(moved), 0, axis)
            shape = [1] * w32.ndim
            shape[axis] = w32.shape[axis]
            offsets = (np.arange(w32.shape[axis], dtype=np.int32) * codebook.shape[1]).reshape(shape)
        codebook = codebook.astype(weight.dtype)
        fit = {"iterations": km.iterations, "counts": counts.sum(axis=0),
               "zeros": bool((km.zero_code >= 0).any()), "importance": importance}
        return codebook, np.ascontiguousarray(codes_w), offsets, fit

    def _change(self, target: _Target, weight: np.ndarray, rebuilt: np.ndarray, codebook: np.ndarray,
                enc: _codes.Encoded, fit: dict, costs: dict) -> Change:
        flat = weight.reshape(-1).astype(np.float32, copy=False)
        diff = rebuilt.reshape(-1).astype(np.float32, copy=False) - flat
        norm = float(np.sqrt(np.float64(np.dot(flat, flat))))
        err = float(np.sqrt(np.float64(np.dot(diff, diff))))
        rel = err / norm if norm > 0 else err
        before_bytes = weight.nbytes
        huff = (_codes.huffman_bits(fit["counts"]) + 7) // 8
        detail = {
            "weight": target.weight, "bits": self.bits, "codebook_size": int(codebook.shape[-1]),
            "codebooks": int(codebook.shape[0]), "clusters_used": int(np.count_nonzero(fit["counts"])),
            "container": enc.container, "weight_rel_error": rel,
            "bytes_before": int(before_bytes), "bytes_after": int(enc.nbytes), "code_bytes": int(enc.code_bytes()),
            "huffman_code_bytes": int(huff), "exact_zero_code": fit["zeros"], "iterations": fit["iterations"],
        }
        if fit["importance"] is not None:
            imp = np.broadcast_to(fit["importance"], weight.shape).reshape(-1)
            wnorm = float(np.sqrt(np.dot(imp, np.square(flat, dtype=np.float64))))
            werr = float(np.sqrt(np.dot(imp, np.square(diff, dtype=np.float64))))
            detail["weighted_rel_error"] = werr / wnorm if wnorm else 0.0
        node = target.nodes[0]
        before = cost_dict(costs.get(node.name or node.output[0]))
        after = dict(before, bytes=max(0, before["bytes"] - int(before_bytes)) + int(enc.nbytes))
        if len(target.nodes) > 1:
            detail["shared_with"] = [n.name for n in target.nodes[1:]]
        return Change(node.name, node.op_type, f"clustered to {codebook.shape[-1]} values", before, after,
                      rel, detail)


# ---- bias correction on the clustered model's own activations --------------------------------------
def _recapture_biases(original: onnx.ModelProto, model: onnx.ModelProto,
                      items: list[tuple[list[onnx.NodeProto], Change]], ctx: PassContext) -> None:
    """Layer by layer, in waves that never hold a layer and one upstream of it: the mean of each
    clustered layer's output in `model` (clustered and corrected upstream) is moved onto the
    original's, measured on the fitting samples, where that also lowers the held-out samples'
    error (the mean shift relative to the original output's energy, per `holdout.choose`)."""
    cal = ctx.calibration
    held = cal.validation if holdout.has_held_out(cal) else None
    data = Samples(Samples.of(cal.train).groups + (Samples.of(held).groups if held is not None else []))
    n_fit = runtime.sample_count(cal.train)
    change_of = {n.output[0]: c for nodes, c in items for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")}
    axis = {n.output[0]: 1 if n.op_type == "Conv" else -1 for nodes, _ in items for n in nodes}
    reference = _channel_means(original, list(change_of), axis, data, n_fit)
    for wave in _levels(model, list(change_of)):
        view = GraphView(model.graph)
        current = _channel_means(model, wave, axis, data, n_fit)
        for tensor in wave:
            (ref_fit, ref_held, energy), (fit, held_mean, _) = reference[tensor], current[tensor]
            correction = ref_fit - fit

            def error(shift: np.ndarray | None, c: np.ndarray, energy: float = energy) -> float | None:
                return None if shift is None else float(np.sqrt(np.sum(np.square(shift - c)) / max(energy, 1e-30)))

            gap = ref_held - held_mean if held is not None else None
            verdict = holdout.choose(holdout.Errors(0.0, error(gap, correction)),
                                     holdout.Errors(error(correction, 0.0), error(gap, 0.0)))
            change = change_of[tensor]
            corrected = verdict.kept and _add_to_bias(view, view.producers[tensor], correction)
            change.detail["bias_corrected"] = change.detail.get("bias_corrected", False) or bool(corrected)
            change.detail.update(verdict.detail())


def _channel_means(model: onnx.ModelProto, names: list[str], axis: dict[str, int], data: Samples, n_fit: int
                   ) -> dict[str, tuple[np.ndarray, np.ndarray | None, float]]:
    """Per tensor: the per-channel mean on the first `n_fit` samples and on the rest, and the mean
    squared norm of one channel vector on the first ones."""
    sums: dict[str, list] = {n: [0.0, 0.0, 0.0, 0, 0] for n in names}
    seen = 0
    for batch in calib.iter_activations(model, names, data):
        count = len(next(iter(batch.values())))
        part = 0 if seen < n_fit else 1
        seen += count
        for name, value in batch.items():
            flat = np.moveaxis(value.astype(np.float64), axis[name], -1).reshape(-1, value.shape[axis[name]])
            acc = sums[name]
            acc[part] = acc[part] + flat.sum(0)
            acc[3 + part] += len(flat)
            if part == 0:
                acc[2] += float(np.sum(np.square(flat)))
    return {n: (a[0] / max(a[3], 1), a[1] / a[4] if a[4] else None, a[2] / max(a[3], 1)) for n, a in sums.items()}


def _levels(model: onnx.ModelProto, tensors: list[str]) -> list[list[str]]:
    """`tensors` in waves: each one's wave comes after every wave holding a tensor upstream of it."""
    wanted = set(tensors)
    level: dict[str, int] = {}
    for node in model.graph.node:
        lv = max((level.get(i, 0) for i in node.input if i), default=0)
        for o in node.output:
            level[o] = lv + (1 if o in wanted else 0)
    waves: dict[int, list[str]] = {}
    for t in tensors:
        waves.setdefault(level.get(t, 1), []).append(t)
    return [waves[k] for k in sorted(waves)]


# ---- helpers ------------------------------------------------------------------------------------
def _bias_verdict(node: onnx.NodeProto, weight: np.ndarray, delta: np.ndarray, shift: np.ndarray,
                  fit: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray] | None) -> holdout.Verdict:
    """The layer's output error with and without the correction, on the fitting and held-out
    statistics: the mean shift exactly, the rest from the per-channel variances (off-diagonal
    input covariances ignored), relative to the output energy estimated the same way."""
    weight = weight.astype(np.float64)

    def errors(stat: tuple[np.ndarray, np.ndarray] | None, correction: np.ndarray) -> float | None:
        if stat is None:
            return None
        mean, var = (_expand_channels(node, s, delta.shape) for s in (stat[0], np.maximum(stat[1] - stat[0] ** 2, 0)))
        if mean is None or var is None:
            return None
        moved = _output_shift(node, delta, mean)
        spread = _output_shift(node, delta * delta, var)
        energy = np.sum(np.square(_output_shift(node, weight, mean)))
        energy += np.sum(_output_shift(node, weight * weight, var))
        if moved is None or spread is None or not energy > 0:
            return None
        return float(np.sqrt((np.sum(np.square(moved - correction)) + np.sum(spread)) / energy))

    zero = np.zeros_like(shift)
    return holdout.choose(holdout.Errors(errors(fit, shift), errors(held, shift)),
                          holdout.Errors(errors(fit, zero), errors(held, zero)))



def _cluster_task(item: tuple[ClusterPass, str, int, int], *, weights: dict[str, np.ndarray],
                  importance: dict[str, np.ndarray]) -> tuple:
    """One weight's k-means as an executor task, seeded from the weight's name."""
    fitter, name, channel_axis, seed = item
    rng = PassContext(seed=seed).rng(f"cluster:{name}")
    return fitter._cluster(weights[name], channel_axis, importance.get(name), rng)


class _TrialNames:
    """Stands in for a GraphView in `_codes.encode`: fresh names, none of them reserved."""

    def __init__(self, view: GraphView):
        self.view = view
        self.taken: set[str] = set()

    def unique_name(self, base: str) -> str:
        name, i = base, 0
        while name in self.view._names or name in self.taken:
            name, i = f"{base}__{i}", i + 1
        self.taken.add(name)
        return name


def _weight_slot(node: onnx.NodeProto, view: GraphView) -> int | None:
    """1 when input 1 of a Conv/ConvTranspose/Gemm/MatMul is a constant weight (and input 0 is not), else None."""
    ins = node.input
    return 1 if len(ins) > 1 and ins[1] in view.initializers and ins[0] not in view.initializers else None


def _key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _channel_moments(node: onnx.NodeProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sum and sum of squares per input channel of `x` over one batch, and the terms per channel."""
    x = x.astype(np.float64, copy=False)
    if node.op_type in ("Conv", "ConvTranspose"):
        axes = tuple(i for i in range(x.ndim) if i != 1)
        return np.sum(x, axis=axes), np.sum(x * x, axis=axes), x.size // x.shape[1]
    if node.op_type == "Gemm" and attr(node, "transA", 0):
        return np.sum(x, axis=1), np.sum(x * x, axis=1), x.shape[1]
    flat = x.reshape(-1, x.shape[-1])
    return np.sum(flat, axis=0), np.sum(flat * flat, axis=0), flat.shape[0]


def _output_shift(node: onnx.NodeProto, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[dW x] per output channel, with `mean` the input mean expanded like the weight."""
    op = node.op_type
    if op == "Conv":
        return np.sum(delta * mean, axis=tuple(range(1, delta.ndim)))
    if op == "Gemm":  # in the units of C, which _add_to_bias writes
        scale = stored_to_bias(node)
        return None if scale is None else scale * np.sum(delta * mean, axis=1 - weight_out_axis(node))
    if op == "MatMul" and delta.ndim == 2:
        return np.sum(delta * mean, axis=0)
    return None


def _add_to_bias(view: GraphView, node: onnx.NodeProto, shift: np.ndarray) -> bool:
    """Add `shift` (one value per output channel) to the bias of `node` (created if missing)."""
    op = node.op_type
    if op == "MatMul":
        users = view.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in view.graph_outputs:
            return False
        add = users[0]
        slot = 1 if add.input[0] == node.output[0] else 0
        bias = view.const(add.input[slot])
        if bias is None or bias.ndim > 1 or bias.size not in (1, shift.size):
            return False
        view.set_input_const(add, slot, (bias + shift).astype(bias.dtype))
        return True
    slot = 2
    if len(node.input) > slot and node.input[slot]:
        bias = view.const(node.input[slot])
        if bias is None:
            return False
        if op == "Conv" and bias.shape != shift.shape:
            return False
        try:
            new = (bias + shift.reshape((1,) * max(bias.ndim - 1, 0) + shift.shape)).astype(bias.dtype)
        except ValueError:
            return False
        view.set_input_const(node, slot, new)
        return True
    weight = view.initializers.get(node.input[1])
    dtype = np.float32 if weight is None else onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)
    name = view.add_const(f"{node.name or node.output[0]}_bias", shift.astype(dtype))
    while len(node.input) < slot:
        node.input.append("")
    node.input.append(name)
    view.consumers[name].append(node)
    return True


def _expand_channels(node: onnx.NodeProto, channel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """A per-input-channel quantity laid out like the weight (broadcastable to `shape`)."""
    op = node.op_type
    if op == "Conv":
        c_out, c_in_g = shape[0], shape[1]
        groups = attr(node, "group", 1)
        if channel.size != c_in_g * groups or c_out % groups:
            return None
        per_group = c_out // groups
        index = (np.arange(c_out)[:, None] // per_group) * c_in_g + np.arange(c_in_g)[None, :]
        return channel[index].reshape(c_out, c_in_g, *([1] * (len(shape) - 2)))
    if op == "ConvTranspose":
        if channel.size != shape[0]:
            return None
        return channel.reshape(shape[0], *([1] * (len(shape) - 1)))
    if op == "Gemm":
        k_axis = 1 - weight_out_axis(node)
        if channel.size != shape[k_axis]:
            return None
        return channel.reshape(1, -1) if k_axis == 1 else channel.reshape(-1, 1)
    if op == "MatMul" and len(shape) >= 2 and channel.size == shape[-2]:
        return channel.reshape(-1, 1)
    return None


def _compact(centroids: np.ndarray, codes: np.ndarray, counts: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop unused centroids: K becomes the largest number used in any row (rows padded)."""
    used = counts > 0
    k = max(1, int(used.sum(axis=1).max()))
    if k == centroids.shape[1] and used.all():
        return centroids, codes, counts
    rank = np.cumsum(used, axis=1) - 1  # new index of each used centroid
    rows = centroids.shape[0]
    new_c = np.empty((rows, k))
    new_counts = np.zeros((rows, k), dtype=counts.dtype)
    new_codes = np.empty_like(codes)
    for r in range(rows):
        keep = np.nonzero(used[r])[0]
        vals = centroids[r, keep] if keep.size else centroids[r, :1]
        new_c[r, :vals.size] = vals
        new_c[r, vals.size:] = vals[-1]
        new_counts[r, :keep.size] = counts[r, keep]
        new_codes[r] = np.maximum(rank[r], 0).astype(codes.dtype)[codes[r]]
    return new_c, new_codes, new_counts


def _rebuild(codebook: np.ndarray, codes: np.ndarray, axis: int | None) -> np.ndarray:
    """What the Gather pattern computes: W from its codebook [R, K] and codes."""
    if axis is None:
        return codebook[0][codes]
    shape = [1] * codes.ndim
    shape[axis] = codes.shape[axis]
    rows = np.arange(codes.shape[axis]).reshape(shape)
    return codebook[rows, codes]
