"""The `onnxc` command line: parse, call the API, render. Data to stdout; progress and logs to stderr.

Exit codes: 0 ok, 1 error (bad input), 2 usage, 3 verification failed. Errors are one line on
stderr without a traceback (`-v` adds it for internal errors).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from onnxc.compiler.recipe import PRESETS
from onnxc.errors import OnnxcError, UsageError
from onnxc.progress import INTERVAL, PlainProgress

# Everything the CLI prints is literal: node names (`/model.22/cv2.0/m[cv2]`), paths and extras
# (`onnxc[plot]`) carry brackets that rich would otherwise read as markup and drop (styling is
# given as `Text` styles instead, see `_error`), and a line is never broken inside a path
# (soft wrap: the terminal wraps it, copying it gives it whole). Tables still fit the width.
stderr = Console(stderr=True, markup=False, soft_wrap=True)
stdout = Console(markup=False, soft_wrap=True)


def _error(prefix: str, message: str) -> None:
    """One error line on stderr: a red prefix ("error:", "internal error:") and the literal message."""
    stderr.print(Text.assemble((prefix, "red"), " ", message), highlight=False)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, list[int]]:
    shapes = {}
    for value in values:
        name, eq, dims = value.rpartition("=")
        if not eq or not name:
            raise UsageError(f"--input-shape expects NAME=DIMS like input=1x3x224x224, got '{value}'")
        try:
            parsed = [int(d) for d in dims.lower().replace(",", "x").split("x")]
        except ValueError:
            raise UsageError(f"--input-shape {name}: dims must be integers separated by x, got '{dims}'") from None
        if any(d <= 0 for d in parsed):
            raise UsageError(f"--input-shape {name}: dims must be positive, got '{dims}'")
        shapes[name] = parsed
    return shapes


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def command(fn):
    """Shared -q/-v flags and the one-line error contract for every subcommand."""

    @click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
    @click.option("-v", "--verbose", count=True, help="More logging (-vv for debug and tracebacks).")
    @functools.wraps(fn)
    def wrapper(*args, quiet: bool = False, verbose: int = 0, **kwargs):
        _setup_logging(verbose, quiet)
        try:
            return fn(*args, quiet=quiet, **kwargs)
        except OnnxcError as exc:
            _error("error:", str(exc))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            stderr.print("interrupted")
            sys.exit(130)
        except Exception as exc:  # an internal error: still one line unless asked for more
            if verbose > 1:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _error("internal error:", f"{type(exc).__name__}: {first} (run with -vv for details)")
            sys.exit(1)

    return wrapper


def _interval() -> float:
    """Seconds between progress lines in a log (ONNXC_PROGRESS_INTERVAL, default 30)."""
    try:
        return max(0.1, float(os.environ.get("ONNXC_PROGRESS_INTERVAL", INTERVAL)))
    except ValueError:
        return INTERVAL


class _ProgressReporter:
    """Turns `ctx.progress(label, done, total)` calls into one rich progress bar per label.

    Labels name a phase of a pass ("prune: capture", "prune: fits", "svd: capture", ...), of the
    manager ("passes", "verification") or of an export ("int8: calibration", "int8: sensitivity",
    "int8: exclusion", "compile", "verification"); counts are real units (samples streamed, layers
    fitted), so the remaining time is an honest estimate. A phase that runs again restarts its bar.
    When stderr is not a terminal the same calls become plain lines (`onnxc.progress`).
    """

    def __init__(self, enabled: bool):
        # stderr redirected to a file or a pipe: plain lines a log can hold, not a redrawn bar
        self.plain = PlainProgress(sys.stderr, _interval()) if enabled and not stderr.is_terminal else None
        enabled = enabled and self.plain is None
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("elapsed"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=stderr,
            transient=True,
            # Off where stderr is no terminal: a transient bar shows nothing there, and rich would
            # end it with a blank line before the summary or the one-line error.
            disable=not enabled or not stderr.is_interactive,
        )
        self.tasks: dict[str, int] = {}
        self.last: dict[str, tuple[int, int]] = {}

    def __enter__(self):
        self.progress.__enter__()
        if self.plain is not None:
            self.plain.__enter__()
        return self

    def __exit__(self, *exc):
        if self.plain is not None:
            self.plain.__exit__(*exc)
        return self.progress.__exit__(*exc)

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.plain is not None:
            self.plain(label, done, total)
            return
        task = self.tasks.get(label)
        last_done, last_total = self.last.get(label, (0, total))
        self.last[label] = (done, total)
        if task is None:
            self.tasks[label] = self.progress.add_task(label, total=total, completed=done)
        elif done < last_done or total != last_total:
            self.progress.reset(task, total=total, completed=done)  # the phase runs again (next pass)
        else:
            self.progress.update(task, completed=done)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxc")
def cli() -> None:
    """onnxc: compress trained ONNX models with verified rewrites; lower them to onnxruntime or C."""


def main(args: list[str] | None = None, prog_name: str = "onnxc") -> None:
    """Entry point: click's usage errors become one line (exit 2), like every other error."""
    try:
        rv = cli.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.UsageError as exc:
        hint = f" (see 'onnxc {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        _error("error:", f"{exc.format_message()}{hint}")
        sys.exit(2)
    except click.exceptions.Abort:
        stderr.print("aborted")
        sys.exit(1)
    except click.exceptions.ClickException as exc:
        _error("error:", exc.format_message())
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _input_shape_option(fn):
    return click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=DIMS",
        help="Fix symbolic dims, e.g. input=1x3x224x224.",
    )(fn)


def _calibration_options(fn):
    """--calibration and --preprocess: the data options optimize, export, compare and bench share."""
    fn = click.option("--preprocess", metavar="SPEC",
                      help="Image folders: size=HxW,letterbox,scale=1/255,mean=..,std=..,layout=NCHW,rgb.")(fn)
    return click.option("--calibration", type=click.Path(),
                        help=".npz (one array per input, samples on axis 0), .npy (single input), or a folder "
                             "of .npy/.npz samples (dynamic dims may differ) or images (see --preprocess).")(fn)


def _backend_options(fn):
    """--int8, --name and --level: the options `optimize --backend` and `export` share."""
    fn = click.option(
        "--level",
        type=click.Choice(["portable", "machine"]),
        default="portable",
        help="onnxruntime backend: offline optimization level.",
    )(fn)
    fn = click.option("--name", default="net", help="C backend: symbol prefix.")(fn)
    return click.option(
        "--int8",
        "int8",
        is_flag=False,
        flag_value="static",
        default=None,
        type=click.Choice(["static", "dynamic"]),
        help="Quantize to int8 (static by default; the C backend runs static only).",
    )(fn)


def _check_backend_options(backend: str | None, int8: str | None, name: str) -> None:
    if int8 and backend not in ("onnxruntime", "c"):
        raise UsageError("--int8 needs --backend onnxruntime or c")
    if int8 == "dynamic" and backend == "c":
        raise UsageError("--int8 dynamic needs --backend onnxruntime (the C backend runs static int8)")
    if backend == "c" and not name.isidentifier():
        raise UsageError(f"--name must be a C identifier, got '{name}'")


def _input_file(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise OnnxcError(f"{path}: no such file")
    return path


@cli.command()
@click.argument("model")
@click.option(
    "-o",
    "--output",
    required=True,
    help="Output model (.onnx; .ort with --backend onnxruntime; a folder for --backend c).",
)
@click.option(
    "-p", "--pass", "specs", multiple=True, metavar="SPEC", help="name[:key=value,...], repeatable, in order."
)
@click.option("--preset", type=click.Choice(["lossless", "balanced", "aggressive"]), help="A ready-made pass list.")
@click.option("--recipe", type=click.Path(), help="A TOML recipe file.")
@_calibration_options
@_input_shape_option
@click.option(
    "--max-error",
    type=float,
    help="Fidelity budget (relative L2 error of the outputs, or --metric); passes beyond it are rolled back. "
    "Default: the preset's, else 0.25 (stated in the report); inf for none.",
)
@click.option(
    "--target",
    metavar="KIND=RATIO",
    help="Allocate per-layer levels of the -p techniques (default prune, svd, tucker, cluster) to reach this "
    "fraction of the original's macs, params, size (bytes on disk) or latency (onnxruntime), least error first.",
)
@click.option(
    "--fit",
    "fit",
    multiple=True,
    metavar="flash|ram=SIZE|instructions=N",
    help="With --backend c: compress until the linked Cortex-M firmware fits (e.g. --fit flash=256K --fit ram=64K "
    "--fit instructions=4.5M); flash and RAM are measured with arm-none-eabi-size on every verified plan, "
    "instructions per inference on the emulated Cortex-M4 (qemu -icount).",
)
@click.option(
    "--metric",
    metavar="MODULE:FUNC",
    help="FUNC(reference_outputs, candidate_outputs) -> error (0 = identical) judging every budget and target.",
)
@click.option("--plot", type=click.Path(), help="With --target: draw error against cost per layer (.png or .svg).")
@click.option("--report", "report_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--seed", type=int, default=None, help="Seed for sampling and random inputs (default 0).")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes for per-layer work (alone: local processes; default: the machine's cores "
                   "for --target and presets that allocate, else 1, in-process).")
@click.option("--executor", "executor", type=click.Choice(["local", "ray"]), default=None,
              help="Run per-layer work on local processes or as Ray tasks (pip install 'onnxc[ray]').")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="Ray cluster to use with --executor ray (default: start a local one).")
@click.option("--backend", type=click.Choice(["onnxruntime", "c"]), help="Also lower the result with this backend.")
@_backend_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@command
def optimize(
    model,
    output,
    specs,
    preset,
    recipe,
    calibration,
    preprocess,
    input_shapes,
    max_error,
    target,
    fit,
    metric,
    plot,
    report_path,
    seed,
    jobs,
    executor,
    ray_address,
    backend,
    int8,
    name,
    level,
    as_json,
    quiet,
):
    """Compress MODEL with passes, verify it against the original, and write OUT."""
    from onnxc.api import optimize as run_optimize
    from onnxc.backends import ExportOptions
    from onnxc.compiler.report import render

    _check_backend_options(backend, int8, name)
    if Path(output).resolve() == Path(model).resolve():
        raise UsageError("output would overwrite the input model; choose another -o")
    shapes = _parse_shapes(input_shapes)
    allocating = target or fit or PRESETS.get(preset or "", {}).get("target")
    if jobs is None and executor is None and ray_address is None and allocating:
        jobs = os.cpu_count() or 1  # the sensitivity sweep is one task per candidate-level: use the cores
    with _ProgressReporter(not quiet) as progress:
        result = run_optimize(
            model,
            passes=list(specs),
            preset=preset,
            recipe=recipe,
            calibration=calibration,
            preprocess=preprocess,
            input_shapes=shapes,
            max_error=max_error,
            seed=seed,
            output=output,
            backend=backend,
            export_options=ExportOptions(int8=int8, name=name, input_shapes=shapes, level=level),
            progress=progress,
            jobs=jobs,
            executor=executor,
            ray_address=ray_address,
            target=target,
            fit=list(fit),
            metric=metric,
            plot=plot,
        )
    if report_path:
        result.report.write(report_path)
    if as_json:
        click.echo(result.report.to_json())
    if not quiet:
        render(result.report, stderr)
        stderr.print(f"wrote {output}")


@cli.command()
@click.argument("model")
@click.option("--backend", type=click.Choice(["onnxruntime", "c"]), required=True)
@click.option("-o", "--output", required=True, help="Output file (.onnx or .ort) or folder (C).")
@_backend_options
@_calibration_options
@_input_shape_option
@click.option("--max-error", type=float,
              help="Budget for the written model against MODEL (per-channel relative L2, or --metric) on held-out "
              "calibration samples; int8 leaves its most sensitive nodes float to stay within it.")
@click.option("--metric", metavar="MODULE:FUNC",
              help="FUNC(reference_outputs, candidate_outputs) -> error (0 = identical) judging --max-error.")
@click.option("--seed", type=int, default=0)
@click.option("--report", "report_path", type=click.Path(), help="Write the backend report (JSON) here.")
@command
def export(model, backend, output, int8, calibration, preprocess, input_shapes, name, max_error, metric, level, seed,
           report_path, quiet):
    """Lower MODEL to onnxruntime (optimized .onnx/.ort, int8) or to C for microcontrollers."""
    from onnxc.api import export as run_export
    from onnxc.compiler.report import int8_lines, write_text_atomic

    _check_backend_options(backend, int8, name)
    with _ProgressReporter(not quiet) as progress:
        info = run_export(
            model,
            backend,
            output,
            int8=int8,
            calibration=calibration,
            preprocess=preprocess,
            input_shapes=_parse_shapes(input_shapes),
            name=name,
            seed=seed,
            max_error=max_error,
            level=level,
            metric=metric,
            progress=progress,
        )
    if report_path:
        write_text_atomic(Path(report_path), json.dumps(info, indent=2, default=str) + "\n")
    if not quiet:
        for line in int8_lines(info):
            stderr.print(line, highlight=False, soft_wrap=True)
        stderr.print(f"wrote {output}")


@cli.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_input_shape_option
@click.option("--all", "show_all", is_flag=True, help="List every node, not only those with parameters or MACs.")
@command
def inspect(model, as_json, input_shapes, show_all, quiet):
    """Per-layer table: parameters, MACs and bytes, with totals."""
    from onnxc.api import inspect_model
    from onnxc.compiler.report import human
    from onnxc.compiler.shapes import format_shapes
    from onnxc.passes.channel_groups import describe_groups

    canonical, cost = inspect_model(model, _parse_shapes(input_shapes))
    groups = describe_groups(canonical)
    if as_json:
        click.echo(json.dumps({**cost.to_dict(), "prunable_groups": groups}, indent=2))
        return
    table = Table(show_edge=False)
    for col, justify in (
        ("node", "left"),
        ("op", "left"),
        ("output shape", "left"),
        ("params", "right"),
        ("MACs", "right"),
        ("bytes", "right"),
    ):
        table.add_column(col, justify=justify, overflow="fold")
    for layer in cost.layers:
        if show_all or layer.params or layer.macs or layer.unknown:
            table.add_row(
                layer.name,
                layer.op,
                "x".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in layer.shape),
                human(layer.params),
                human(layer.macs) + ("?" if layer.unknown else ""),
                human(layer.bytes),
            )
    t = cost.totals()
    unknown = cost.unknown_dims
    table.add_section()
    table.add_row("total", f"{t['nodes']} nodes", "", f"{t['params']:,}", f"{t['macs']:,}" + ("?" if unknown else ""),
                  f"{t['bytes']:,}")
    stdout.print(table)
    if cost.input_shapes:
        stdout.print(f"input shapes: {format_shapes(cost.input_shapes)} ({cost.shapes_origin})", highlight=False)
    if unknown:
        stdout.print(f"?: MACs counted with unknown dims taken as 1 ({', '.join(unknown)}); "
                     "pass --input-shape to fix them", highlight=False)
    frozen = sum(1 for g in groups if g["frozen"])
    stdout.print(f"prunable channel groups: {len(groups) - frozen} ({frozen} frozen)")


@cli.command()
@click.argument("reference")
@click.argument("candidate")
@_calibration_options
@_input_shape_option
@click.option("--max-error", type=float, help="Exit 3 when the error (or --metric) exceeds this.")
@click.option("--metric", metavar="MODULE:FUNC", help="FUNC(reference_outputs, candidate_outputs) -> error.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--seed", type=int, default=0)
@command
def compare(reference, candidate, calibration, preprocess, input_shapes, max_error, metric, as_json, seed, quiet):
    """Fidelity of CANDIDATE against REFERENCE on the same inputs."""
    from onnxc.api import compare as run_compare
    from onnxc.errors import VerificationError

    fidelity = run_compare(
        reference, candidate, calibration=calibration, preprocess=preprocess,
        input_shapes=_parse_shapes(input_shapes), seed=seed, metric=metric,
    )
    if as_json:
        click.echo(json.dumps(fidelity.to_dict(), indent=2))
    else:
        table = Table(show_edge=False)
        for col in ("output", "rel. L2", "per channel", "logits", "max abs", "cosine", "top-1 agree"):
            table.add_column(col)
        for o in fidelity.outputs:
            table.add_row(
                o.name,
                f"{o.rel_l2:.3g}",
                f"{o.channel_rel_l2:.3g}" if o.channel_rel_l2 is not None else "-",
                f"{o.logit_rel_l2:.3g}" if o.logit_rel_l2 is not None else "-",
                f"{o.max_abs:.3g}",
                f"{o.cosine:.6f}",
                f"{100 * o.top1:.2f}%" if o.top1 is not None else "-",
            )
        stdout.print(table)
        stdout.print(f"{fidelity.samples} samples" + (f", metric {fidelity.metric:.4g}" if metric else ""))
    if max_error is not None and fidelity.error > max_error:
        raise VerificationError(f"error {fidelity.error:.3g} exceeds {max_error:g}")


@cli.command()
@click.argument("models", nargs=-1, required=True)
@_calibration_options
@_input_shape_option
@click.option("--batch", type=int, default=1, help="Samples per run (random inputs).")
@click.option("--runs", type=int, default=50)
@click.option("--warmup", type=int, default=5)
@click.option("--threads", type=int, default=1, help="onnxruntime intra-op threads (0 = all cores).")
@click.option("--json", "as_json", is_flag=True)
@command
def bench(models, calibration, preprocess, input_shapes, batch, runs, warmup, threads, as_json, quiet):
    """onnxruntime latency of MODELS side by side (interleaved runs, medians, ratio vs the first)."""
    from onnxc.compiler import calibration as calib
    from onnxc.compiler.bench import bench as run_bench
    from onnxc.compiler.canonical import canonicalize
    from onnxc.compiler.model import load

    shapes = _parse_shapes(input_shapes)
    calib.calibration_data.check_preprocess(calibration, preprocess)
    # .ort files cannot be read as ONNX: they are timed from their path, inputs come from an .onnx.
    loaded = [_input_file(m) if str(m).lower().endswith(".ort") else load(m) for m in models]
    spec = next((m for m in loaded if not isinstance(m, str)), None)
    if spec is None:
        raise UsageError("bench needs at least one .onnx model to read the input spec from")
    if calibration:
        samples, _ = calib.calibration_data.load(calibration, spec, preprocess)
        inputs = next(samples.batches(batch))  # the first `batch` samples of one shape
    else:
        inputs = calib.random_inputs(canonicalize(spec, shapes, infer=False), batch, input_shapes=shapes)
    timings = run_bench(loaded, inputs, labels=list(models), runs=runs, warmup=warmup, threads=threads)
    if as_json:
        click.echo(json.dumps([t.__dict__ for t in timings], indent=2))
        return
    table = Table(show_edge=False)
    for col in ("model", "median ms", "ratio"):
        table.add_column(col)
    for t in timings:
        table.add_row(t.label, f"{t.median_ms:.3f}", f"{t.ratio:.3f}x")
    stdout.print(table)


@cli.command(name="passes")
@click.option("--json", "as_json", is_flag=True)
@command
def list_passes(as_json, quiet):
    """Every pass with its options and defaults."""
    from onnxc.compiler.passes import available, option_defaults, option_fields

    rows = []
    for pid, cls in available().items():
        defaults = option_defaults(cls)
        opts = []
        for f in option_fields(cls):
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            opts.append(
                {
                    "name": f.name,
                    "type": type_name,
                    "default": defaults[f.name],
                    "help": cls.option_help.get(f.name, ""),
                }
            )
        rows.append(
            {
                "id": pid,
                "summary": cls.summary,
                "lossless": cls.lossless,
                "uses_calibration": cls.uses_calibration,
                "options": opts,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        stdout.print(Text.assemble((row["id"], "bold"), "  ", row["summary"]), highlight=False)
        for o in row["options"]:
            stdout.print(f"    {o['name']} ({o['type']}, default {o['default']!r})  {o['help']}", highlight=False)
    if not rows:
        stdout.print("no passes registered")


if __name__ == "__main__":  # pragma: no cover
    main()
