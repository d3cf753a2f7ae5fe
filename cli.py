"""`pwgroup`: argument parsing and exit codes only; the work is graphopt's.

Exit codes: 0 success, 1 a reduction below --fail-under (or a failed internal check: a
pwgroup bug), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import tempfile
import warnings

EXIT_OK, EXIT_BELOW_THRESHOLD, EXIT_BAD_INPUT = 0, 1, 2
EXIT_BUG = 1  # a failed internal check; shares 1 with --fail-under, as CI treats both as failures


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, as every other error is (the full usage is in --help)."""

    commands: dict[str, argparse.ArgumentParser] = {}
    """The top level's subcommand parsers by name (set by _parser)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"pwgroup: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """An unknown option points to its command's --help, where the options are."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            command = self.commands.get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pwgroup",
        description="Replace the pointwise convolutions of a Keras or ONNX model with kEffNet's "
        "grouped sub-architecture and report the savings.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices
    rewrite = sub.add_parser("rewrite", help="rewrite a model, save it and print the report")
    rewrite.add_argument("model", help=".keras, .h5 or .onnx file, or keras.applications:Name")
    rewrite.add_argument(
        "-o",
        "--output",
        help="where to save (default: MODEL.pwgroup.keras/.onnx in the current folder)",
    )
    report = sub.add_parser("report", help="the same without writing a model (dry run)")
    report.add_argument("model", nargs="+", help="model files, globs or keras.applications:Name")
    export = sub.add_parser(
        "export",
        help="convert a Keras model (rewritten or not) to ONNX "
        "with tf2onnx; rewritten sites become grouped Conv nodes",
    )
    export.add_argument("model", help=".keras or .h5 file, or keras.applications:Name")
    export.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    export.add_argument("--opset", type=_positive, default=17)
    _finetune_parser(sub)
    for p in (rewrite, report):
        p.add_argument(
            "--mode",
            choices=("paper", "linear"),
            default="paper",
            help="paper: BN/activation in both branches (default); linear: only the conv",
        )
        p.add_argument(
            "--init",
            choices=("scratch", "fit"),
            default="scratch",
            help="scratch: fresh K and L, as the paper (default); fit (linear mode): K and L "
            "fitted to the original kernel, so a trained model stays close before retraining",
        )
        p.add_argument("--min-channels-per-group", type=_positive, default=16, metavar="N")
        p.add_argument(
            "--include",
            action="append",
            default=[],
            metavar="GLOB",
            help="rewrite only sites whose name matches (repeatable)",
        )
        p.add_argument(
            "--exclude",
            action="append",
            default=[],
            metavar="GLOB",
            help="leave sites whose name matches (repeatable)",
        )
        p.add_argument(
            "--keep-last",
            type=int,
            default=0,
            metavar="N",
            help="leave the last N sites (nearest the output) as they are",
        )
        slower = p.add_mutually_exclusive_group()
        slower.add_argument(
            "--skip-slower",
            action="store_true",
            help="ONNX: time each site in onnxruntime (spinning off, threads pinned) and leave "
            "those that would run slower than the dense conv",
        )
        slower.add_argument(
            "--fold-slower",
            action="store_true",
            help="ONNX: time each site in onnxruntime (spinning off, threads pinned); one that "
            "would run slower keeps its grouped weights but runs as one dense conv onnxruntime "
            "folds from them at load (left as it is when its branches are not linear)",
        )
        p.add_argument(
            "--latency",
            nargs="?",
            const=(1, 8, 32),
            type=_batches,
            metavar="BATCH,...",
            help="time the original and the rewritten model in onnxruntime on --provider at "
            "these batch sizes (default 1,8,32): runs interleaved, medians, worker threads' "
            "spinning off and thread count pinned to the usable cores, as in every timing "
            "pwgroup does; Keras models are timed through their tf2onnx export (export extra). "
            "Write it after MODEL, or as --latency=1,8",
        )
        _calibration_arguments(p)
        p.add_argument(
            "--dense-sequences",
            action="store_true",
            help="also rewrite Dense (ONNX: MatMul/Gemm) layers on rank-3 inputs (sequences, "
            "transformer MLPs); by default only those on rank-4/5 feature maps are sites",
        )
        p.add_argument("--seed", type=int, default=0, help="seed of the new weights (default 0)")
        p.add_argument("--json", metavar="FILE", help="write the report as JSON")
        p.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
        p.add_argument(
            "--fail-under",
            type=float,
            metavar="PCT",
            help="exit 1 when trainable parameters drop by less than PCT percent",
        )
        p.add_argument(
            "--no-verify",
            action="store_true",
            help="ONNX: skip the check of the result in onnx.checker and onnxruntime",
        )
        p.add_argument(
            "--provider",
            default="CPUExecutionProvider",
            help="ONNX: onnxruntime provider for the check and the timing of sites "
            "(falls back to CPU)",
        )
        p.add_argument("--quiet", action="store_true", help="print nothing on success")
        p.add_argument(
            "--progress",
            action="store_true",
            help="show progress on stderr even when it is not a terminal",
        )
        p.add_argument(
            "--html", metavar="FILE", help="write a self-contained HTML page with a chart per site"
        )
    for p in (rewrite, report, export):
        p.add_argument("--classes", type=_positive, help="keras.applications: number of classes")
        p.add_argument(
            "--input-shape", type=_shape, metavar="H,W,C", help="keras.applications: input shape"
        )
        p.add_argument(
            "--trust-model",
            action="store_true",
            help="load models that need unsafe deserialisation (runs their code)",
        )
        p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="distil the original model into its rewrite (labels optional), on one device or many",
    )
    # two positionals, not nargs=2 with a tuple metavar: argparse's help crashes on that
    p.add_argument("original", metavar="ORIGINAL", help="the trained model (.keras or .h5)")
    p.add_argument(
        "rewritten", metavar="REWRITTEN", help="its rewrite (.keras or .h5, e.g. pwgroup rewrite's)"
    )
    p.add_argument("--data", required=True, help=".npy/.npz file, a folder of them or of images")
    p.add_argument("-o", "--output", required=True, help="the .keras file to write")
    p.add_argument("--epochs", type=_positive, default=5)
    p.add_argument("--batch-size", type=_positive, default=128, help="global batch (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam, cosine decay (default 2e-3)")
    p.add_argument("--temperature", type=float, default=2.0, help="softens class scores (2)")
    p.add_argument(
        "--alpha", type=float, default=0.5, help="weight of cross-entropy with labels (0.5)"
    )
    p.add_argument(
        "--train-only",
        choices=("all", "sites"),
        default="all",
        help="all layers (default), or only the new K/L and their BatchNormalization",
    )
    p.add_argument(
        "--strategy",
        choices=("auto", "one", "mirrored", "multiworker"),
        default="auto",
        help="tf.distribute: auto (multiworker with TF_CONFIG, mirrored with several GPUs)",
    )
    p.add_argument(
        "--validation-split", type=float, default=0.1, help="share of DATA held out (0.1)"
    )
    p.add_argument("--validation-data", metavar="DATA", help="held-out samples instead")
    p.add_argument(
        "--preprocess",
        choices=("0..1", "-1..1", "imagenet", "none"),
        default="0..1",
        help="image folders: pixel scaling (default 0..1)",
    )
    p.add_argument("--limit", type=_positive, metavar="N", help="use the first N samples")
    p.add_argument(
        "--no-bn-reestimate",
        action="store_true",
        help="keep BatchNormalization statistics as training left them (by default those at "
        "or after the first weight that changed are estimated again from the data)",
    )
    p.add_argument(
        "--checkpoint-dir", metavar="DIR", help="checkpoints each epoch (default OUT.checkpoint)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write the closing report as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--trust-model", action="store_true", help="load models that run code")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    """--calibrate and what it enables (graphopt.calibrate)."""
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--calibrate",
        metavar="DATA",
        help="fit each site's new weights to reproduce the original on these samples of the "
        "model's inputs (.npy, .npz with one array per input, a folder of them, or a folder of "
        "images) and report the agreement on a held-out part",
    )
    data.add_argument(
        "--measure",
        metavar="DATA",
        help="only measure the agreement with the original on DATA (no fitting)",
    )
    p.add_argument(
        "--preprocess",
        choices=("0..1", "-1..1", "imagenet", "none"),
        default="0..1",
        help="image folders: pixel scaling (default 0..1, x/255, what most user-trained "
        "networks expect; keras.applications EfficientNet wants none)",
    )
    p.add_argument(
        "--held-out",
        type=float,
        default=0.25,
        metavar="SHARE",
        help="share of the data kept for measuring, never fitted on (default 0.25)",
    )
    p.add_argument(
        "--groups",
        choices=("rule", "auto"),
        default="rule",
        help="rule: the paper's group count; auto: per site the largest allowed one whose "
        "calibrated error stays within --max-site-error",
    )
    p.add_argument(
        "--max-site-error",
        type=float,
        metavar="E",
        help="--groups auto: bound on a site's held-out relative error (default: the loosest "
        "bound at which the targets hold; 0.1 without targets)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        metavar="A",
        help="leave the most damaging sites as they were until the held-out top-1 agreement "
        "with the original is at least A (0..1)",
    )
    p.add_argument(
        "--max-output-error",
        type=float,
        metavar="E",
        help="the same for the outputs' relative L2 error",
    )
    p.add_argument(
        "--scores",
        action="append",
        default=[],
        metavar="OUTPUT",
        help="this output holds class scores (compared by top-1 agreement), e.g. raw logits; "
        "probabilities and log-probabilities on the last axis are found by themselves "
        "(repeat for several outputs)",
    )
    p.add_argument(
        "--distill-steps",
        type=_non_negative,
        default=0,
        metavar="N",
        help="Keras: after calibration, train the sites for N steps (rounded up to whole "
        "passes) to reproduce the original's outputs on the fitted samples, no labels needed "
        "(200 is a good start; default 0: off)",
    )


def _non_negative(text: str) -> int:
    value = int(text) if text.strip().lstrip("+-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, not '{text}'")
    return value


def _positive(text: str) -> int:
    value = int(text) if text.strip().lstrip("+-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not '{text}'")
    return value


def _batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected batch sizes like 1,8,32, not '{text}' (write --latency after MODEL)"
        ) from None
    if any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return batches


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected integers like 224,224,3") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError("dimensions must be positive")
    return dims


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"pwgroup: {message}", file=sys.stderr)
    return code


def _expand(models: list[str]) -> list[str]:
    out = []
    for m in models:
        if any(c in m for c in "*?[") and not m.startswith("keras.applications:"):
            found = sorted(glob.glob(m, recursive=True))
            if not found:
                raise FileNotFoundError(f"{m}: no file matches this pattern")
            out += found
        else:
            out.append(m)
    return out


def _precheck(source: str) -> str | None:
    """Cheap checks before importing TensorFlow (which takes seconds)."""
    if not source or source.startswith("keras.applications:"):
        return None
    if not os.path.exists(source):
        return f"{source}: no such file"
    return None


def _output_targets(args) -> list[str]:
    """Every file this command will write: the model (-o) and each report file."""
    wanted = [getattr(args, a, None) for a in ("output", "json", "markdown", "html")]
    return [path for path in wanted if path]


def _unwritable(path: str) -> str | None:
    """Why `path` cannot be written (None when it can), found before any work is done, so that
    a report file in a missing folder does not fail the run after the model was written."""
    if os.path.isdir(path):
        return f"{path}: is a folder; name a file to write"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        return f"{path}: folder {folder} does not exist; create it or name another file"
    if not os.path.isdir(folder):
        return f"{path}: {folder} is a file, not a folder; name another file"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path}: folder {folder} is not writable; name another file"
    return None


def _default_output(source: str, kind: str) -> str:
    stem = (
        source.split(":", 1)[1]
        if kind == "application"
        else os.path.splitext(os.path.basename(source))[0]
    )
    return f"{stem}.pwgroup.{'onnx' if kind == 'onnx' else 'keras'}"


def _size_when_saved(graphopt, model) -> int:
    ext = ".onnx" if type(model).__name__ == "ModelProto" else ".keras"
    with tempfile.TemporaryDirectory() as tmp:
        return graphopt.save(model, os.path.join(tmp, "model" + ext))


def _size_on_disk(source: str, kind: str) -> int:
    """The model file's size, with the external data files an ONNX model's weights are in."""
    if kind != "onnx":
        return os.path.getsize(source)
    from graphopt.backends.onnx_io import external_data_size

    return os.path.getsize(source) + external_data_size(source)


def _write_text(path: str, text: str, inputs: list[str]) -> None:
    for source in inputs:
        if os.path.exists(source) and os.path.exists(path) and os.path.samefile(source, path):
            raise OSError(f"{path}: refusing to overwrite the input model")
    from graphopt.atomic import replacing

    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def _run_one(graphopt, args, source: str, output: str | None):
    """Load, rewrite, check, save (when asked) and measure one model; return its report."""
    from graphopt.progress import step, wanted

    show = wanted(args.progress, args.quiet)
    kind = graphopt.model_kind(source)
    with step(f"loading {source}", show):
        model = graphopt.load(
            source, classes=args.classes, input_shape=args.input_shape, trust_model=args.trust_model
        )
    data = args.calibrate or args.measure
    if data and show:
        _say(f"{'calibrating' if args.calibrate else 'measuring'} {source} on {data}")
    with step(f"rewriting {source}", show and not data):
        new_model, report = graphopt.rewrite(
            model,
            mode=args.mode,
            min_channels_per_group=args.min_channels_per_group,
            seed=args.seed,
            name=source,
            include=args.include,
            exclude=args.exclude,
            keep_last=args.keep_last,
            skip_slower=args.skip_slower,
            fold_slower=args.fold_slower,
            init=args.init,
            provider=args.provider,
            calibration=args.calibrate or args.measure,
            calibrate=args.measure is None,
            groups=args.groups,
            min_agreement=args.min_agreement,
            max_output_error=args.max_output_error,
            max_site_error=args.max_site_error,
            held_out=args.held_out,
            preprocess=args.preprocess,
            progress=_say if show else None,
            dense_sequences=args.dense_sequences,
            distill_steps=args.distill_steps,
            scores=tuple(args.scores),
        )
    if kind == "onnx" and report.sites and not args.no_verify:
        import gc

        from graphopt.backends.onnx_io import is_large, shape_only, without_weights
        from graphopt.backends.onnx_verify import verify

        path = None
        if is_large(model) and not args.latency:
            # the weights are in the input file: let onnxruntime alone hold them from there
            model, path = without_weights(model, shape_only), source
            gc.collect()  # the rewrite's graph objects hold the original in reference cycles
        with step("checking in onnxruntime", show):
            verify(model, new_model, provider=args.provider, original_path=path)
    if args.latency:
        with step("timing in onnxruntime (--latency)", show):
            report.latency = _latency(graphopt, args, kind, model, new_model)
    with step(f"saving {output}" if output else "measuring file sizes", show):
        report.totals.file_size_before = (
            _size_on_disk(source, kind)
            if kind == "onnx" or source.endswith(".keras")
            else _size_when_saved(graphopt, model)
        )
        if kind == "keras" and not source.endswith(".keras"):  # like with like: .keras both
            report.notes.append(
                f"file sizes compare both models saved as .keras; {source} itself is "
                f"{os.path.getsize(source):,} bytes (an .h5 may hold optimizer state too)"
            )
        if output is not None:
            report.totals.file_size_after = graphopt.save(new_model, output, source=source)
        else:
            report.totals.file_size_after = _size_when_saved(graphopt, new_model)
    return report


def _precheck_finetune(args) -> str | None:
    for path in (args.data, args.validation_data):
        if path is not None and not os.path.exists(path):
            return f"{path}: no such file or folder"
    if not args.output.endswith(".keras"):
        return f"{args.output}: the fine-tuned model is saved as .keras; name the output *.keras"
    for source in args.model:
        if os.path.exists(args.output) and os.path.samefile(source, args.output):
            return f"{args.output}: refusing to overwrite the input model"
    return None


def _around_onednn_crash(graphopt, args, sources: list[str]) -> int | None:
    """A command that trains a Keras model whose training step kills TensorFlow's process with
    oneDNN on (see graphopt.train_probe) runs again with oneDNN off, saying so; where the user
    turned oneDNN on, one line says what to do. None: go on."""
    from graphopt import train_probe as probe

    finetune = args.command == "finetune"
    if not (finetune or getattr(args, "distill_steps", 0) and args.calibrate):
        return None
    if os.environ.get("PWGROUP_TRAIN_PROBED") or not probe.onednn_may_be_on():
        return None
    model, data = (sources[1], args.data) if finetune else (sources[0], args.calibrate)
    if graphopt.model_kind(model) != "keras":
        return None
    number = probe.step_crashes(model, data, args.trust_model)
    if number is None:
        return None
    signal = probe.signal_name(number)
    what = f"training {model} kills TensorFlow with oneDNN on ({signal} in a test step)"
    if os.environ.get(probe.ONEDNN) is not None:
        return _fail(f"{what}: run with {probe.ONEDNN}=0")
    print(f"pwgroup: note: {what}: running with {probe.ONEDNN}=0", file=sys.stderr, flush=True)
    env = dict(os.environ, PWGROUP_TRAIN_PROBED="1", **{probe.ONEDNN: "0"})
    code = "import sys, cli; sys.exit(cli.main())"
    os.execve(sys.executable, [sys.executable, "-c", code, *args.argv], env)


def _finetune(graphopt, args, sources: list[str]) -> int:
    """Load both models, distil, and (the chief only) write the model and the report."""
    for source in sources:
        if graphopt.model_kind(source) != "keras":
            return _fail(
                f"{source}: finetune takes Keras models; fine-tune an ONNX model in the framework "
                "it came from (see docs/finetune.md)"
            )
    from graphopt.runtime import require_keras

    require_keras("finetune")
    from graphopt.backends import keras_distill

    strategy = keras_distill.make_strategy(args.strategy)  # before any model is built
    teacher, student = (graphopt.load(s, trust_model=args.trust_model) for s in sources)
    checkpoint = args.checkpoint_dir or args.output + ".checkpoint"
    try:
        model, result = graphopt.finetune(
            teacher,
            student,
            args.data,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            alpha=args.alpha,
            train_only=args.train_only,
            strategy=strategy,
            validation_split=args.validation_split,
            validation_data=args.validation_data,
            preprocess=args.preprocess,
            limit=args.limit,
            bn_reestimate=not args.no_bn_reestimate,
            checkpoint_dir=checkpoint,
            seed=args.seed,
            verbose=0 if args.quiet else "auto",
            teacher_name=sources[0],
            student_name=sources[1],
        )
    except KeyboardInterrupt:
        from graphopt.checkpoint import resume_epoch

        done = resume_epoch(checkpoint)
        if not done:
            return _fail("interrupted before the first epoch ended; nothing to resume", 130)
        return _fail(
            f"interrupted; {checkpoint} holds epoch {done} of {args.epochs}: run the same "
            "command again to resume at the next epoch",
            130,
        )
    if result.chief:
        size = graphopt.save(model, args.output, source=sources[1])
        if args.json:
            _write_text(args.json, result.to_json(), sources)
    keras_distill.remove_checkpoint(result.checkpoint)
    if not args.quiet:
        sys.stdout.write(result.to_text())
        if result.chief:
            print(f"wrote {args.output} ({size:,} bytes)")
    return EXIT_OK


def _say(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _latency(graphopt, args, kind: str, model, new_model) -> list:
    """--latency: both models timed in onnxruntime (Keras ones through tf2onnx)."""
    from graphopt.backends.onnx_timing import latency

    if kind != "onnx":
        with graphopt.quiet.silenced_stderr():  # tf2onnx logs through TF's C++ runtime
            model, new_model = graphopt.export_onnx(model), graphopt.export_onnx(new_model)
    timings, notes = latency(model, new_model, args.latency, args.provider)
    for note in notes if not args.quiet else []:
        print(f"pwgroup: note: --latency {note}", file=sys.stderr)
    return timings


def _export(graphopt, args, source: str) -> int:
    if graphopt.model_kind(source) == "onnx":
        return _fail(f"{source}: already an ONNX model")
    model = graphopt.load(
        source, classes=args.classes, input_shape=args.input_shape, trust_model=args.trust_model
    )
    with graphopt.quiet.silenced_stderr():  # tf2onnx logs through TF's C++ runtime
        proto = graphopt.export_onnx(model, opset=args.opset)
    size = graphopt.save(proto, args.output, source=source)
    print(f"wrote {args.output} ({size:,} bytes, opset {args.opset})")
    return EXIT_OK


def _check_runtime(graphopt, args, sources: list[str]) -> None:
    """Before any work: onnxruntime must be there when an ONNX model will be checked or timed
    (MissingRuntimeError otherwise); warn when both onnxruntime builds are installed, and when
    the provider asked for is not available."""
    timing = next(
        (f"--{w}-slower" for w in ("skip", "fold") if getattr(args, f"{w}_slower", False)), None
    )
    checking = not getattr(args, "no_verify", True)
    if getattr(args, "latency", None):
        timing = "--latency"  # Keras models too: they are timed through their ONNX export
    elif not (checking or timing) or not any(graphopt.model_kind(s) == "onnx" for s in sources):
        return
    from graphopt import runtime

    checking = checking and any(graphopt.model_kind(s) == "onnx" for s in sources)
    what = "the models" if timing == "--latency" else "sites"
    ort = runtime.onnxruntime(
        f"to time {what} for {timing}"
        if timing and not checking
        else "to check rewritten ONNX models (--no-verify skips the check)"
    )
    warning = runtime.conflict()
    if warning:
        print(f"pwgroup: warning: {warning}", file=sys.stderr)
    if args.provider not in ort.get_available_providers():
        print(
            f"pwgroup: note: {args.provider} is not available here; using CPUExecutionProvider",
            file=sys.stderr,
        )


def _summary(reports) -> str:
    width = max(12, max(len(r.model) for r in reports))
    lines = [f"{'model':{width}} {'sites':>6} {'params before':>14} {'after':>12} {'saved':>8}"]
    for r in reports:
        t = r.totals
        lines.append(
            f"{r.model:{width}} {len(r.sites):>6} {t.trainable_params_before:>14,} "
            f"{t.trainable_params_after:>12,} {t.reduction_pct:>7.2f}%"
        )
    return "\n".join(lines) + "\n"


def _main(args) -> int:
    sources = _expand(args.model if isinstance(args.model, list) else [args.model])
    data = getattr(args, "calibrate", None) or getattr(args, "measure", None)
    for source in sources + ([data] if data else []):
        problem = _precheck(source)
        if problem:
            return _fail(problem)
    if args.command == "finetune" and (problem := _precheck_finetune(args)):
        return _fail(problem)
    for path in _output_targets(args):
        if problem := _unwritable(path):
            return _fail(problem)
    import graphopt  # its import keeps TensorFlow's C++ runtime off stderr

    if not args.debug:  # TensorFlow's advice on retracing (calibration runs many sub-models)
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    _check_runtime(graphopt, args, sources)
    if (code := _around_onednn_crash(graphopt, args, sources)) is not None:
        return code
    if args.command == "finetune":
        return _finetune(graphopt, args, sources)
    if args.command == "export":
        return _export(graphopt, args, sources[0])
    output = None
    if args.command == "rewrite":
        output = args.output or _default_output(sources[0], graphopt.model_kind(sources[0]))
    reports = [_run_one(graphopt, args, s, output) for s in sources]
    if not args.quiet:
        color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        for r in reports:
            sys.stdout.write(r.to_text(color=color))
        if len(reports) > 1:
            sys.stdout.write("\n" + _summary(reports))
        if output:
            print(f"wrote {output}")
    import json

    if args.json:
        data = (
            reports[0].to_dict()
            if len(reports) == 1
            else {
                "schema_version": graphopt.report.SCHEMA_VERSION,
                "models": [r.to_dict() for r in reports],
            }
        )
        _write_text(args.json, json.dumps(data, indent=2) + "\n", sources)
    if args.markdown:
        _write_text(args.markdown, "\n".join(r.to_markdown() for r in reports), sources)
    if args.html:
        from graphopt.report_html import render_html

        _write_text(args.html, render_html(reports), sources)
    if args.fail_under is not None:
        from graphopt.report import change

        below = [
            r
            for r in reports
            if r.totals.reduction_pct < args.fail_under or r.totals.reduction_pct < 0
        ]
        for r in below:
            _fail(
                f"{r.model}: trainable parameters {change(r.totals.reduction_pct)}, "
                f"below --fail-under {args.fail_under:g}%",
                EXIT_BELOW_THRESHOLD,
            )
        if below:
            return EXIT_BELOW_THRESHOLD
    return EXIT_OK


def _notice(message, category, filename, lineno, file=None, line=None) -> None:
    """graphopt.errors.Notice as one line on stderr; other warnings as Python shows them."""
    from graphopt.errors import Notice

    if issubclass(category, Notice):
        print(f"pwgroup: note: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    warnings.showwarning = _notice
    if args.command == "finetune":
        args.model = [args.original, args.rewritten]
    try:
        return _main(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # every failure becomes one line; --debug shows the traceback
        if args.debug:
            raise
        from graphopt.errors import GraphoptError, InternalError

        models = args.model if isinstance(args.model, list) else [args.model]
        extra = ("data", "output", "checkpoint_dir")
        named = models + [p for p in (getattr(args, a, None) for a in extra) if p]
        line = _one_line(exc)
        if not any(m in line for m in named):
            line = f"{', '.join(models)}: {line}"  # every message names the file
        if isinstance(exc, InternalError):
            return _fail(
                f"internal error, a bug in pwgroup (nothing was written; please report it): {line}",
                EXIT_BUG,
            )
        if isinstance(exc, (GraphoptError, OSError)):
            return _fail(line)
        return _fail(
            f"unexpected error: {type(exc).__name__}: {line} (run with --debug for the traceback)"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
