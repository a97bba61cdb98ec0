"""Weight clustering: speed against scikit-learn, the 4096x4096 Gemm end to end, and accuracy/size.

Run from the repository root::

    python benchmarks/cluster.py            # everything (several minutes: vgg19/alexnet/zfnet included)
    python benchmarks/cluster.py --quick    # skip the large light models

Prints, side by side:
1. our 1-D k-means vs scikit-learn KMeans (n_init=1) on the same weights (time ratio, and the
   squared error each reaches), for a 100k sample and for the whole 4096x4096 layer;
2. `onnxc optimize gemm4096.onnx -o out.onnx -p cluster:bits=8` timed as a subprocess (load to
   save) and in-process with a per-stage breakdown;
3. held-out accuracy, file size and Huffman size for every sample at bits 2..8;
4. the onnx package's light architectures (random weights) clustered, saved and run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from graphs import randomize_weights  # noqa: E402
from sample_data import CALIBRATION, SAMPLE_MODELS, accuracy, sample_path  # noqa: E402

from onnxc.api import optimize  # noqa: E402
from onnxc.compiler import runtime  # noqa: E402
from onnxc.compiler.calibration import with_outputs  # noqa: E402
from onnxc.compiler.canonical import canonicalize  # noqa: E402
from onnxc.compiler.model import save  # noqa: E402
from onnxc.compiler.passes import PassContext, create  # noqa: E402
from onnxc.passes._kmeans1d import kmeans1d  # noqa: E402

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
LIGHT_SMALL = ["squeezenet", "shufflenet", "resnet50", "densenet121", "inception_v1", "inception_v2"]
LIGHT_LARGE = ["vgg19", "bvlc_alexnet", "zfnet512"]


def gemm_model(n: int = 4096, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, n)) * np.sqrt(2.0 / n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1)], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(n, np.float32), "b")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def sse(x: np.ndarray, centroids: np.ndarray, codes: np.ndarray) -> float:
    return float(np.sum((centroids[codes] - x.astype(np.float64)) ** 2))


def bench_kmeans(weights: np.ndarray) -> None:
    from sklearn.cluster import KMeans

    print("\n== 1-D k-means vs scikit-learn KMeans(n_init=1), K=256 ==")
    print(f"{'data':>22} {'ours s':>8} {'sklearn s':>10} {'speedup':>8} {'ours SSE/sklearn SSE':>22}")
    flat = weights.reshape(-1)
    sample = flat[np.random.default_rng(0).choice(flat.size, 100_000, replace=False)]
    for init in ("linear", "kmeans++"):
        t = time.perf_counter()
        ours = kmeans1d(sample, 256, init=init, rng=np.random.default_rng(0))
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        km = KMeans(256, n_init=1, random_state=0).fit(sample.reshape(-1, 1).astype(np.float64))
        t_sk = time.perf_counter() - t
        ratio = sse(sample, ours.centroids[0], ours.codes[0]) / km.inertia_
        print(f"{'100k sample, ' + init:>22} {t_ours:8.3f} {t_sk:10.3f} {t_sk / t_ours:7.0f}x {ratio:22.3f}")
    t = time.perf_counter()
    full = kmeans1d(flat, 256)
    t_full = time.perf_counter() - t
    # scikit-learn on all 16.8M values would take minutes: scale its 100k time linearly (a lower
    # bound: Lloyd's iterations are O(N K) each).
    est = t_sk * flat.size / sample.size
    print(f"{'4096x4096, linear':>22} {t_full:8.3f} {est:9.0f}* {est / t_full:7.0f}x {'':>22}")
    print("  * scikit-learn time on the full layer extrapolated linearly from the 100k sample")
    err = np.linalg.norm(full.centroids[0][full.codes[0]] - flat) / np.linalg.norm(flat)
    print(f"  full layer: {full.iterations} Lloyd iterations, weight relative error {err:.4f}")
    print("\n  initializations on the full 4096x4096 layer (weight relative error, seconds):")
    for k in (16, 256):
        row = []
        for init in ("linear", "density", "kmeans++", "companded"):
            t = time.perf_counter()
            r = kmeans1d(flat, k, init=init, rng=np.random.default_rng(0))
            dt = time.perf_counter() - t
            e = np.linalg.norm(r.centroids[0][r.codes[0]] - flat) / np.linalg.norm(flat)
            row.append(f"{init} {e:.4f} ({dt:.2f}s)")
        print(f"  K={k:<4} " + "   ".join(row))


def bench_end_to_end(tmp: Path) -> None:
    print("\n== 4096x4096 Gemm, cluster:bits=8, load to save ==")
    src = tmp / "gemm4096.onnx"
    onnx.save(gemm_model(), src)
    out = tmp / "gemm4096_c.onnx"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxc", "optimize", str(src), "-o", str(out), "-p",
                           "cluster:bits=8"], capture_output=True, text=True)
    t_cli = time.perf_counter() - t
    status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
    print(f"onnxc optimize (subprocess, incl. interpreter start): {t_cli:.1f} s   [{status}]")
    if out.exists():
        print(f"file: {src.stat().st_size / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB "
              f"({out.stat().st_size / src.stat().st_size:.3f}x)")
    t = time.perf_counter()
    result = optimize(src, passes=["cluster:bits=8"], output=tmp / "gemm4096_api.onnx")
    t_api = time.perf_counter() - t
    rec = result.report.passes[0]
    print(f"onnxc.api.optimize (in-process): {t_api:.1f} s, of which the pass + its verification "
          f"{rec.seconds:.1f} s; rel. error {result.report.fidelity['rel_l2']:.4f}")
    d = rec.changes[0].detail
    print(f"layer: K={d['codebook_size']}, weight rel. error {d['weight_rel_error']:.4f}, "
          f"{d['bytes_before'] / 1e6:.1f} MB -> {d['bytes_after'] / 1e6:.1f} MB, Huffman codes "
          f"{d['huffman_code_bytes'] / 1e6:.1f} MB")


def bench_samples(bits_list: list[int]) -> None:
    print("\n== samples: held-out accuracy and file size (fitted on digits_calib) ==")
    print("file x: default containers (UINT4 for 1-4 bits, UINT8 for 5-8); tight x: packing=tight "
          "(exact bit width, same codes); huffman x: default file with the codes Huffman-coded")
    print(f"{'model':>10} {'bits':>4} {'acc %':>7} {'delta':>6} {'file x':>7} {'tight x':>7} {'huffman x':>9} "
          f"{'pass s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in SAMPLE_MODELS:
            base = accuracy(sample_path(name))
            size0 = sample_path(name).stat().st_size
            print(f"{name:>10} {'fp32':>4} {base:7.2f} {'':>6} {1.0:7.3f}")
            for bits in bits_list:
                out = Path(tmp) / f"{name}{bits}.onnx"
                res = optimize(sample_path(name), passes=[f"cluster:bits={bits}"], calibration=CALIBRATION,
                               output=out)
                rec = res.report.passes[0]
                acc = accuracy(out)
                info = rec.info
                huff = (out.stat().st_size - info.get("weight_bytes_after", 0) + info.get("huffman_bytes", 0))
                tight = out
                if bits not in (4, 8):
                    tight = Path(tmp) / f"{name}{bits}t.onnx"
                    optimize(sample_path(name), passes=[f"cluster:bits={bits},packing=tight"],
                             calibration=CALIBRATION, output=tight)
                print(f"{'':>10} {bits:>4} {acc:7.2f} {acc - base:+6.2f} {out.stat().st_size / size0:7.3f} "
                      f"{tight.stat().st_size / size0:7.3f} {huff / size0:9.3f} {rec.seconds:7.2f}")


def bench_light(names: list[str]) -> None:
    print("\n== light architectures (random He weights), cluster:bits=4 then bits=8 ==")
    print(f"{'model':>14} {'bits':>4} {'MB in':>7} {'file x':>7} {'pass s':>7} {'logits rel err':>15} "
          f"{'4-bit codes':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            src = canonicalize(randomize_weights(canonicalize(onnx.load(LIGHT / f"light_{name}.onnx")), seed=0))
            inp = src.graph.input[0].name
            feed = {inp: np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
            soft = [n.input[0] for n in src.graph.node if n.op_type == "Softmax"]
            probe = soft[0] if soft else src.graph.output[0].name
            ref = runtime.run(with_outputs(src, [probe]), feed)[probe]
            mb = sum(len(t.raw_data) for t in src.graph.initializer) / 1e6
            for bits in (4, 8):
                t = time.perf_counter()
                result = create("cluster", {"bits": bits}).run(canonicalize(src), PassContext(seed=0))
                dt = time.perf_counter() - t
                path = save(canonicalize(result.model), Path(tmp) / f"{name}.onnx")
                got = runtime.run(with_outputs(onnx.load(path), [probe]), feed)[probe]
                err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                note = result.info.get("codes_4bit", "")[:12] if bits == 4 else ""
                print(f"{name:>14} {bits:>4} {mb:7.1f} {path.stat().st_size / 1e6 / mb:7.3f} {dt:7.1f} "
                      f"{err:15.4f} {note:>12}")
                os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip vgg19, alexnet and zfnet512")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench_end_to_end(Path(tmp))
    w = numpy_helper.to_array(gemm_model().graph.initializer[0])
    bench_kmeans(w)
    bench_samples([2, 3, 4, 5, 6, 7, 8])
    bench_light(LIGHT_SMALL + ([] if args.quick else LIGHT_LARGE))


if __name__ == "__main__":
    main()
