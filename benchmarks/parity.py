"""Does the cut network learn as well? The paper's Table 1 (kEffNet-B0 against EfficientNet-B0,
trained from scratch at 32x32), reproduced on real data, against the small networks a user
would pick instead (issue 12).

Every row is trained from scratch with one recipe: the same optimiser, schedule, augmentation,
epochs, batch size, seed, data order and 32x32x3 input. Rows:

- EfficientNetB0 and its pwgroup rewrite in `paper` mode (the paper's pair), and in `linear`
  mode (what the BN/activation in both branches buys);
- MobileNetV2 (alpha 1.0) and its `paper` rewrite (a second family);
- MobileNetV3Small and MobileNetV2 at the width multiplier whose trainable parameter count
  comes closest to the rewritten B0's.

After training, every BatchNormalization's statistics are re-estimated on --bn-images training
images for every row (MobileNetV2/V3's momentum 0.999 otherwise leaves them near their initial
values after a few hundred steps: chance accuracy); the accuracy with training's own statistics
is printed beside it.

Printed per row: test accuracy, trainable parameters, training seconds per epoch (tracing
excluded) and onnxruntime CPU latency of the tf2onnx export at batch 1 and 32 (spinning off,
fixed threads, all models interleaved, medians); where the export fails, Keras CPU latency,
marked `k`.

Inputs: each model gets what it expects. keras.applications' EfficientNet and MobileNetV3
rescale inside the model and take 0..255; MobileNetV2 has no preprocessing layer and takes
-1..1.

Usage:
  python benchmarks/parity.py [--train N] [--test N] [--epochs E] [--batch B] [--seed S]
      [--rows b0,b0-paper,...] [--cifar10 DIR] [--json FILE] [--plot FILE.png] [--quick]
  python benchmarks/parity.py --from-json FILE [--plot FILE.png]   # a saved run, no training

docs/parity.md has the full run and what it shows.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: fixtures/, graphopt/

ALL_ROWS = ("b0", "b0-paper", "b0-linear", "v2", "v2-paper", "v3s-alpha", "v2-alpha")
SIZE = 32
CLASSES = 10
MAX_SHIFT = 4  # augmentation: random translation by up to 4 pixels (zero padding) ...
# ... and a random horizontal flip, as the usual CIFAR-10 recipe.


# ---------------------------------------------------------------- data


def load_cifar10(folder: str, split: str, limit: int | None):
    """CIFAR-10's python-pickle layout (data_batch_1..5, test_batch): NHWC float 0..1."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], np.int64))
        if limit is not None and sum(len(y) for y in ys) >= limit:
            break
    x = np.concatenate(xs)[:limit].transpose(0, 2, 3, 1).astype(np.float32) / np.float32(255)
    return x, np.concatenate(ys)[:limit]


def load_data(args):
    if args.cifar10:
        train = load_cifar10(args.cifar10, "train", args.train)
        test = load_cifar10(args.cifar10, "test", args.test)
        return "CIFAR-10", train, test
    from fixtures import fashion_mnist

    return (
        "Fashion-MNIST",
        fashion_mnist.load("train", args.train),
        fashion_mnist.load("test", args.test),
    )


def epoch_data(x, y, seed: int, epoch: int):
    """This epoch's order and augmentation: the same for every row (seeded by seed and epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    padded = np.pad(x, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
    dy, dx = rng.integers(0, 2 * MAX_SHIFT + 1, (2, len(x)))
    flip = rng.random(len(x)) < 0.5
    out = np.empty_like(x)
    for i in range(len(x)):
        crop = padded[i, dy[i] : dy[i] + SIZE, dx[i] : dx[i] + SIZE]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out, y


INPUT_RANGES = {
    "0..255": lambda x: x * np.float32(255),
    "-1..1": lambda x: x * np.float32(2) - np.float32(1),
}


# ---------------------------------------------------------------- models


def params(model) -> tuple[int, int]:
    """(trainable, total) as Keras counts them."""
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return trainable, int(model.count_params())


def efficientnet_b0(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.applications.EfficientNetB0(
        weights=None, classes=CLASSES, input_shape=(SIZE, SIZE, 3)
    )


def mobilenet_v2(seed: int, alpha: float = 1.0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV2(
        weights=None, classes=CLASSES, input_shape=(SIZE, SIZE, 3), alpha=alpha
    )


def mobilenet_v3_small(seed: int, alpha: float = 1.0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.applications.MobileNetV3Small(
        weights=None, classes=CLASSES, input_shape=(SIZE, SIZE, 3), alpha=alpha
    )


def rewritten(build, mode: str):
    def make(seed: int):
        import graphopt

        model, report = graphopt.rewrite(build(seed), mode=mode, seed=seed)
        return model

    return make


def closest_alpha(build, target: int) -> tuple[float, int]:
    """The width multiplier (steps of 0.05, 0.1..1.4) whose trainable count is nearest `target`.

    Counts grow with alpha: bracket on a coarse grid, then search the bracket finely.
    """
    import keras

    cache: dict[float, int] = {}

    def count(alpha: float) -> int:
        if alpha not in cache:
            keras.backend.clear_session()
            cache[alpha] = params(build(0, alpha))[0]
        return cache[alpha]

    coarse = [0.25, 0.5, 0.75, 1.0, 1.4]
    upper = next((a for a in coarse if count(a) >= target), coarse[-1])
    lower = max(0.1, upper - 0.25)
    fine = [round(lower + 0.05 * i, 2) for i in range(int(round((upper - lower) / 0.05)) + 1)]
    best = min(fine, key=lambda a: (abs(count(a) - target), a))
    return best, count(best)


class Row:
    def __init__(self, key, name, build, input_range, family, mode=None):
        self.key, self.name, self.build = key, name, build
        self.input_range, self.family, self.mode = input_range, family, mode


def make_rows(keys, log) -> list[Row]:
    """The rows asked for; the alpha rows are sized on the rewritten B0's trainable count."""
    rows = {
        "b0": Row("b0", "EfficientNetB0", efficientnet_b0, "0..255", "EfficientNet"),
        "b0-paper": Row(
            "b0-paper",
            "EfficientNetB0 + pwgroup paper",
            rewritten(efficientnet_b0, "paper"),
            "0..255",
            "EfficientNet",
            "paper",
        ),
        "b0-linear": Row(
            "b0-linear",
            "EfficientNetB0 + pwgroup linear",
            rewritten(efficientnet_b0, "linear"),
            "0..255",
            "EfficientNet",
            "linear",
        ),
        "v2": Row("v2", "MobileNetV2 1.0", mobilenet_v2, "-1..1", "MobileNetV2"),
        "v2-paper": Row(
            "v2-paper",
            "MobileNetV2 1.0 + pwgroup paper",
            rewritten(mobilenet_v2, "paper"),
            "-1..1",
            "MobileNetV2",
            "paper",
        ),
    }
    if "v3s-alpha" in keys or "v2-alpha" in keys:
        import keras

        keras.backend.clear_session()
        target = params(rewritten(efficientnet_b0, "paper")(0))[0]
        log(f"target: the rewritten B0 has {target:,} trainable parameters")
        a3, n3 = closest_alpha(mobilenet_v3_small, target)
        a2, n2 = closest_alpha(mobilenet_v2, target)
        log(f"closest width: MobileNetV3Small alpha {a3} ({n3:,}), MobileNetV2 alpha {a2} ({n2:,})")
        rows["v3s-alpha"] = Row(
            "v3s-alpha",
            f"MobileNetV3Small {a3}",
            lambda seed: mobilenet_v3_small(seed, a3),
            "0..255",
            "alternative",
        )
        rows["v2-alpha"] = Row(
            "v2-alpha",
            f"MobileNetV2 {a2}",
            lambda seed: mobilenet_v2(seed, a2),
            "-1..1",
            "alternative",
        )
    return [rows[k] for k in keys]


# ---------------------------------------------------------------- training


def train_and_evaluate(row: Row, data, args, log) -> tuple[dict, object]:
    import keras

    (x_train, y_train), (x_test, y_test) = data
    scale = INPUT_RANGES[row.input_range]
    keras.backend.clear_session()
    t0 = time.perf_counter()
    model = row.build(args.seed)
    build_s = time.perf_counter() - t0
    trainable, total = params(model)
    steps_per_epoch = -(-len(x_train) // args.batch)
    schedule = keras.optimizers.schedules.CosineDecay(args.lr, steps_per_epoch * args.epochs)
    keras.utils.set_random_seed(args.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
        run_eagerly=args.eager,
    )
    steps = step_timer()
    epoch_s, history = [], []
    for epoch in range(args.epochs):
        x, y = epoch_data(x_train, y_train, args.seed, epoch)
        t = time.perf_counter()
        h = model.fit(
            scale(x),
            y,
            batch_size=args.batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[steps],
        )
        epoch_s.append(time.perf_counter() - t)
        history.append({k: float(v[-1]) for k, v in h.history.items()})
        log(
            f"  {row.name}: epoch {epoch + 1}/{args.epochs} {epoch_s[-1]:.1f} s, "
            f"loss {history[-1]['loss']:.3f}, train acc {history[-1]['accuracy']:.3f}"
        )
    # The first step traces the training function (tens of seconds): count it apart.
    trace_s = steps.first - statistics.median(steps.times[1:] or [steps.first])
    epoch_s[0] -= trace_s
    t = time.perf_counter()
    loss_k, acc_k = model.evaluate(scale(x_test), y_test, batch_size=256, verbose=0)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    reestimate_batchnorm(model, scale(x_train[: args.bn_images]), 250)
    bn_s = time.perf_counter() - t
    loss, acc = model.evaluate(scale(x_test), y_test, batch_size=256, verbose=0)
    result = {
        "key": row.key,
        "name": row.name,
        "family": row.family,
        "mode": row.mode,
        "input_range": row.input_range,
        "trainable_params": trainable,
        "params": total,
        "test_accuracy": float(acc),
        "test_loss": float(loss),
        "test_accuracy_keras_stats": float(acc_k),
        "test_loss_keras_stats": float(loss_k),
        "bn_reestimate_s": float(bn_s),
        "epoch_s": float(statistics.median(epoch_s)),
        "epoch_s_all": [float(s) for s in epoch_s],
        "trace_s": float(trace_s),
        "build_s": float(build_s),
        "eval_s": float(eval_s),
        "history": history,
    }
    return result, model


def reestimate_batchnorm(model, x, batch: int) -> None:
    """Every BatchNormalization's moving mean and variance set to the average of its batch
    statistics over `x` (forward passes in training mode; weights untouched).

    Training leaves them an exponential average with momentum 0.99 (EfficientNet) or 0.999
    (MobileNetV2/V3): after a thousand steps the latter still remembers its initial mean 0 and
    variance 1, and the network evaluates at chance. Re-estimating them (as in "precise BN")
    for every row puts all rows on the same footing.
    """
    import keras

    layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    saved = [layer.momentum for layer in layers]
    try:
        for k, start in enumerate(range(0, len(x), batch)):
            for layer in layers:
                layer.momentum = k / (k + 1)  # a running average: the first batch overwrites
            model(x[start : start + batch], training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum


def step_timer():
    """A callback holding the wall time of every training step (the first one traces)."""
    import keras

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.first, self._t = [], None, 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            dt = time.perf_counter() - self._t
            if self.first is None:
                self.first = dt
            else:
                self.times.append(dt)

    return StepTimes()


# ---------------------------------------------------------------- latency


def ort_session(proto, threads: int):
    """pwgroup's timing session (spinning off, ORT_ENABLE_ALL) with `threads` intra-op threads."""
    from graphopt.backends.onnx_verify import session, session_options

    options = session_options("to time the models")
    options.inter_op_num_threads = 1
    timed = session(proto, timing=True, options=options)
    if options.intra_op_num_threads != threads:  # session() pins to the usable cores
        options.intra_op_num_threads = threads
        timed = session(proto, options=options)
    return timed


class Runner:
    """One model's inference at a given batch: onnxruntime, or Keras where the export failed."""

    def __init__(self, model, threads: int, log):
        import graphopt

        self.backend = "onnxruntime"
        try:
            proto = graphopt.export_onnx(model)
            self.session = ort_session(proto, threads)
            self.input = self.session.get_inputs()[0].name
        except Exception as exc:  # noqa: BLE001 - any export problem: fall back, say so
            log(f"  ONNX export failed ({type(exc).__name__}: {str(exc)[:200]}); Keras latency")
            self.backend = "keras"
            self.model = model

    def __call__(self, x):
        if self.backend == "onnxruntime":
            return self.session.run(None, {self.input: x})
        return self.model.predict_on_batch(x)


def interleaved_latency(runners: dict, batch: int, repeat: int) -> dict:
    """Median ms per run of each model at `batch`, all models in turn, `repeat` rounds."""
    x = np.random.default_rng(0).random((batch, SIZE, SIZE, 3), dtype=np.float32)
    for run in runners.values():
        run(x)
    times = {key: [] for key in runners}
    for _ in range(repeat):
        for key, run in runners.items():
            t = time.perf_counter()
            run(x)
            times[key].append(time.perf_counter() - t)
    return {key: 1000 * statistics.median(v) for key, v in times.items()}


# ---------------------------------------------------------------- output


COLUMNS = (
    ("model", "name", "{}"),
    ("test acc %", "test_accuracy", "{:.2f}"),
    ("acc, training's BN stats %", "test_accuracy_keras_stats", "{:.2f}"),
    ("trainable params", "trainable_params", "{:,}"),
    ("vs B0", "vs_b0", "{}"),
    ("train s/epoch", "epoch_s", "{:.1f}"),
    ("latency b1 ms", "latency_b1", "{}"),
    ("latency b32 ms", "latency_b32", "{}"),
)


def cell(result: dict, key: str, fmt: str) -> str:
    value = result.get(key)
    if value is None:
        return "-"
    if key.startswith("test_accuracy"):
        value *= 100
    if key.startswith("latency_"):
        mark = "" if result.get("latency_backend") == "onnxruntime" else " k"
        return f"{value:.2f}{mark}"
    return fmt.format(value)


def table(results: list[dict]) -> str:
    b0 = next((r["trainable_params"] for r in results if r["key"] == "b0"), None)
    for r in results:
        r["vs_b0"] = f"{100 * r['trainable_params'] / b0:.1f}%" if b0 else None
    lines = [
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    for r in results:
        lines.append("| " + " | ".join(cell(r, key, fmt) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    """The issue's target: rewritten B0 within 0.5 points of B0, and ahead of same-size rows."""
    by = {r["key"]: r for r in results}
    if "b0" not in by or "b0-paper" not in by:
        return []
    gap = 100 * (by["b0-paper"]["test_accuracy"] - by["b0"]["test_accuracy"])
    held = gap >= -0.5
    out = [
        f"target 1 (rewritten B0 within 0.5 points of B0): {gap:+.2f} points: "
        + ("HELD" if held else "NOT HELD")
    ]
    for key in ("v3s-alpha", "v2-alpha"):
        if key in by:
            d = 100 * (by["b0-paper"]["test_accuracy"] - by[key]["test_accuracy"])
            out.append(
                f"target 2 (rewritten B0 ahead of {by[key]['name']}): {d:+.2f} points: "
                + ("HELD" if d > 0 else "NOT HELD")
            )
    return out


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colours = {"EfficientNet": "tab:blue", "MobileNetV2": "tab:orange", "alternative": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in results:
        marker = {"paper": "s", "linear": "D"}.get(r["mode"], "o")
        x, y = r["trainable_params"] / 1e6, 100 * r["test_accuracy"]
        ax.scatter(x, y, color=colours[r["family"]], marker=marker, s=50)
        below = r["mode"] == "linear"  # it sits next to the paper rewrite: label it below
        ax.annotate(
            r["name"],
            (x, y),
            textcoords="offset points",
            xytext=(5, -11 if below else 4),
            fontsize=8,
        )
    by = {r["key"]: r for r in results}
    for a, b in (("b0", "b0-paper"), ("v2", "v2-paper")):
        if a in by and b in by:
            ax.annotate(
                "",
                xy=(by[b]["trainable_params"] / 1e6, 100 * by[b]["test_accuracy"]),
                xytext=(by[a]["trainable_params"] / 1e6, 100 * by[a]["test_accuracy"]),
                arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8},
            )
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("trainable parameters (millions, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=8000, help="training images (the first N)")
    p.add_argument("--test", type=int, default=None, help="test images (default: all)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's initial rate (cosine to 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bn-images", type=int, default=2000, help="training images to re-estimate BN statistics"
    )
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"of {','.join(ALL_ROWS)}")
    p.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 python-pickle folder instead")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--repeat", type=int, default=30, help="latency rounds (batch 1; /3 at 32)")
    p.add_argument("--eager", action="store_true", help="run_eagerly (no tracing; slower steps)")
    p.add_argument("--json", metavar="FILE", help="write the results (after every row)")
    p.add_argument("--plot", metavar="FILE", help="accuracy against parameters, PNG")
    p.add_argument(
        "--from-json", metavar="FILE", help="train nothing: print and plot a --json file's results"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="pipeline check: 256 training and 256 test images, one epoch, eager, 3 rounds",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs, args.repeat, args.eager = 256, 256, 1, 3, True
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ALL_ROWS]
    if unknown or not keys:
        p.error(
            f"--rows: unknown {', '.join(unknown) or '(none)'}; choose from {','.join(ALL_ROWS)}"
        )
    if args.cifar10 and not os.path.isfile(os.path.join(args.cifar10, "test_batch")):
        p.error(f"--cifar10: no test_batch in {args.cifar10} (the python-pickle layout)")
    args.keys = keys
    return args


def report(results: list[dict], meta: dict, plot_path: str | None) -> None:
    """The table, the verdict and the plot of a run's results."""
    print(
        f"{meta['dataset']}, {meta['train_images']} training / {meta['test_images']} test images, "
        f"{meta['epochs']} epochs, batch {meta['batch']}, Adam {meta['lr']:g} cosine, shift+flip, "
        f"seed {meta['seed']}, BN statistics re-estimated on {meta.get('bn_images', '?')} training "
        f"images; latency: onnxruntime CPU, {meta['threads']} threads "
        "(k: Keras, export failed)"
    )
    print(table(results))
    for line in verdict(results):
        print(line)
    print(f"wall time {meta['wall_s'] / 60:.1f} min")
    if plot_path:
        plot(
            results,
            plot_path,
            f"{meta['dataset']}, {meta['train_images']} train / {meta['test_images']} test "
            f"images, {meta['epochs']} epochs, seed {meta['seed']}",
        )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        report(data["rows"], data["meta"], args.plot)
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    dataset, train, test = load_data(args)
    log(
        f"{dataset}: {len(train[0])} training, {len(test[0])} test images; {args.epochs} epochs, "
        f"batch {args.batch}, Adam {args.lr:g} cosine, shift {MAX_SHIFT} + flip, seed {args.seed}"
    )
    rows = make_rows(args.keys, log)
    results, runners = [], {}
    meta = {
        "dataset": dataset,
        "train_images": len(train[0]),
        "test_images": len(test[0]),
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "bn_images": min(args.bn_images, len(train[0])),
        "threads": args.threads,
        "argv": sys.argv,
    }

    def save() -> None:
        if args.json:
            meta["wall_s"] = time.perf_counter() - start
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)

    for row in rows:
        log(f"{row.name}: training")
        result, model = train_and_evaluate(row, (train, test), args, log)
        runners[row.key] = Runner(model, args.threads, log)
        result["latency_backend"] = runners[row.key].backend
        results.append(result)
        log(
            f"{row.name}: test acc {100 * result['test_accuracy']:.2f}% "
            f"({100 * result['test_accuracy_keras_stats']:.2f}% before BN re-estimation), "
            f"{result['trainable_params']:,} trainable, {result['epoch_s']:.1f} s/epoch, "
            f"trace {result['trace_s']:.1f} s"
        )
        save()
    log(f"latency: {len(runners)} models interleaved, {args.threads} threads, spinning off")
    for batch, repeat in ((1, args.repeat), (32, max(3, args.repeat // 3))):
        for key, ms in interleaved_latency(runners, batch, repeat).items():
            next(r for r in results if r["key"] == key)[f"latency_b{batch}"] = ms
    save()
    meta["wall_s"] = time.perf_counter() - start
    report(results, meta, args.plot)


if __name__ == "__main__":
    main()
