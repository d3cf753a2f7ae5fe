"""Calibration of a rewrite on real data, written once over a small backend interface
(docs/calibration.md): reconstruction site by site, agreement on held-out samples, accuracy
control and per-site group counts.

A backend (graphopt/backends/*_calib.py) knows how to build the rewrite with given weights and
selection, read the inputs of sites out of a model, and run a model. Everything else is here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from graphopt import quality as q
from graphopt.data import Samples
from graphopt.errors import GraphoptError, InputError, UsageError, runtime_reason
from graphopt.fit import Fitted
from graphopt.plan import Selection, SitePlan, allowed_groups
from graphopt.reconstruct import Step, apply_steps, fit_linear, fit_paper, relative_error

HELD_OUT = 0.25
ROWS_PER_SITE = 16384
"""Positions kept per site for fitting (sampled evenly over samples), and as many again at most
for the held-out check: memory stays bounded whatever the data and the feature maps."""
PAPER_ROWS = 16384
BATCH = 32
DEFAULT_SITE_ERROR = 0.1
"""--groups auto without --max-site-error nor agreement targets. With targets, every site error
measured is tried as the bound, loosest first, and the first at which they hold is kept."""


@dataclass(frozen=True)
class SiteInfo:
    """What calibration needs of one site of a built rewrite."""

    plan: SitePlan
    x_original: object
    """The original model's tensor that feeds the site (a name or a symbolic tensor)."""
    x_rewritten: object
    """The same tensor in the rewritten model."""
    weight: np.ndarray
    """The original kernel, F x Cin."""
    bias: np.ndarray | None
    strides: tuple[int, ...]
    channel_axis: int
    steps: list[Step]
    """The BN/activation the site pulls into its branches (paper mode), else []."""


@dataclass
class Built:
    model: object
    report: object
    sites: dict[str, SiteInfo]
    """The sites that can be calibrated, in network order (others keep their init)."""
    handles: dict = field(default_factory=dict)
    """Site name -> what the backend needs to put new weights into `model` in place."""


@dataclass
class RewriteOptions:
    """What a backend's adapter holds besides its own state: the original model and the
    options every rewrite of it is built with."""

    original: object
    mode: str
    min_channels_per_group: int
    seed: int = 0
    name: str | None = None
    dense_sequences: bool = False

    def rewrite_found(self, rewrite, selection: Selection, weights) -> tuple:
        """(model, report, found sites) of the backend's `rewrite` with these options."""
        found: dict = {}
        model, report = rewrite(
            self.original,
            self.mode,
            self.min_channels_per_group,
            self.seed,
            self.name,
            selection,
            weights=weights,
            found=found,
            dense_sequences=self.dense_sequences,
        )
        return model, report, found


@dataclass(frozen=True)
class Distill:
    """--distill-steps: a short label-free distillation of the calibrated rewrite on the fit
    samples (the original as teacher, only the sites train), rounded up to whole passes."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 2e-3
    temperature: float = 2.0

    def passes(self, samples: int) -> int:
        per_pass = max(1, samples // min(self.batch_size, samples))
        return max(1, -(-self.steps // per_pass))


class Backend(Protocol):
    original: object
    output_names: list[str]

    def build(self, selection: Selection, weights: dict[str, Fitted]) -> Built: ...

    def update(self, built: Built, name: str, fitted: Fitted) -> None:
        """Give site `name` of `built.model` the weights `fitted`, in place: the model then
        computes what `build` with those weights would (no rebuild per site)."""
        ...

    def capture(self, model, samples: Samples, keys: list) -> Iterator[list[np.ndarray]]: ...

    def run(self, model, samples: Samples) -> list[np.ndarray]: ...

    def distill(self, model, fit: Samples, held: Samples, options: Distill, seed: int):
        """A copy of `model` with its sites trained to reproduce the original's outputs on
        `fit` (`held` to measure on), and BatchNormalization statistics re-estimated only
        where weights changed; returns (model, steps run, whether the training made it worse
        on `held` so that the model given is returned)."""
        ...


@dataclass(frozen=True)
class Targets:
    """What the user asked for: --min-agreement, --max-output-error, --max-site-error."""

    min_agreement: float | None = None
    max_output_error: float | None = None
    max_site_error: float | None = None
    auto_groups: bool = False

    def wanted(self) -> bool:
        return self.min_agreement is not None or self.max_output_error is not None

    def met(self, outputs: list[q.OutputQuality]) -> bool:
        agreement = q.agreement(outputs)
        if self.min_agreement is not None:
            if agreement is None:
                raise UsageError(
                    "--min-agreement needs an output that holds class scores (probabilities "
                    "or log-probabilities on its last axis): name one with --scores OUTPUT, or "
                    "use --max-output-error"
                )
            if agreement < self.min_agreement:
                return False
        return self.max_output_error is None or q.output_error(outputs) <= self.max_output_error


@dataclass
class Quality:
    """The `quality` section of the report."""

    fit_samples: int
    held_out_samples: int
    calibrated: bool
    outputs: list[q.OutputQuality]
    targets: Targets = field(default_factory=Targets)
    curve: list[dict] = field(default_factory=list)
    """Points (trainable parameters after, agreement, output error, sites left) that
    accuracy control went through, first all sites rewritten."""
    ladder: list[dict] = field(default_factory=list)
    """--groups auto: the same for each site-error bound tried (each a full calibration)."""
    distill: dict = field(default_factory=dict)
    """--distill-steps: steps run, seconds, held-out agreement/output error before it."""

    @property
    def agreement(self) -> float | None:
        return q.agreement(self.outputs)

    @property
    def output_error(self) -> float:
        return q.output_error(self.outputs)

    def as_dict(self) -> dict:
        targets = {k: v for k, v in dataclasses.asdict(self.targets).items() if v}
        return {
            "fit_samples": self.fit_samples,
            "held_out_samples": self.held_out_samples,
            "calibrated": self.calibrated,
            "agreement": self.agreement,
            "output_error": self.output_error,
            "outputs": [o.as_dict() for o in self.outputs],
            "targets": targets,
            "curve": self.curve,
            "ladder": self.ladder,
            "distill": self.distill,
        }


Say = Callable[[str], None]


def quiet(_: str) -> None:
    pass


# ---- activations as rows ----------------------------------------------------------------------


def _rows(array: np.ndarray, info: SiteInfo, keep: int, seed) -> np.ndarray:
    """Positions of one batch as rows (n x Cin): the strided positions K reads, `keep` of
    them per sample, picked with `seed` (so the original and the rewrite give the same ones)."""
    x = np.moveaxis(np.asarray(array), info.channel_axis, -1)
    spatial = tuple(slice(None, None, s) for s in info.strides)
    x = x[(slice(None), *spatial)] if spatial else x
    per_sample = x.reshape(len(x), -1, x.shape[-1])
    count = per_sample.shape[1]
    if keep < count:
        rng = np.random.default_rng(seed)
        pick = np.stack([rng.choice(count, keep, replace=False) for _ in per_sample])
        per_sample = np.take_along_axis(per_sample, pick[..., None], axis=1)
    return per_sample.reshape(-1, x.shape[-1]).astype(np.float32)  # float64 only to fit


def _capture_rows(backend, model, samples, infos, keys, budget, ids) -> dict[str, np.ndarray]:
    """Rows of each site's input over `samples` (at most `budget` rows per site); the same
    positions for the same site and samples, whichever model they are read from."""
    names = list(infos)
    if not names:  # no site that calibration can fit (e.g. all Dense on feature maps)
        return {}
    keep = max(1, -(-budget // len(samples)))
    parts: dict[str, list] = {n: [] for n in names}
    for index, arrays in enumerate(backend.capture(model, samples, keys)):
        for n, array in zip(names, arrays):
            parts[n].append(_rows(array, infos[n], keep, (index, ids[n])))
    return {n: np.concatenate(parts[n])[:budget] for n in names}


def _target(info: SiteInfo, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(what the site replaces computes on `x`, the conv's own output before BN/activation)."""
    pre = x @ info.weight.T.astype(np.float64)
    if info.bias is not None:
        pre = pre + info.bias
    return apply_steps(pre, info.steps), pre


# ---- one site ----------------------------------------------------------------------------------


def predict(info: SiteInfo, plan: SitePlan, fitted: Fitted, x: np.ndarray) -> np.ndarray:
    """The rewritten site's output on rows `x` (NumPy; BN' as fitted)."""
    from graphopt.reconstruct import _Blocks

    b = _Blocks(plan)
    kb = np.asarray(fitted.kw, np.float64).reshape(b.n, b.s, b.c)
    z = b.grouped(kb, x.T).T
    if fitted.k_bias is not None:
        z = z + fitted.k_bias
    u = apply_steps(z, info.steps)
    mixed = u[:, b.perm]
    if not plan.has_l:
        return mixed
    lb = np.asarray(fitted.lw, np.float64).reshape(b.n, b.s, b.s)
    v = b.grouped(lb, mixed.T).T
    if fitted.l_bias is not None:
        v = v + fitted.l_bias
    steps = info.steps
    if fitted.l_norm is not None:
        eps = next(s.epsilon for s in steps if s.kind == "affine")
        scale = np.asarray(fitted.l_norm[0], np.float64) / np.sqrt(1 + eps)
        steps = [
            Step("affine", scale, np.asarray(fitted.l_norm[1], np.float64))
            if s.kind == "affine"
            else s
            for s in steps
        ]
    return u + apply_steps(v, steps)


def solve(info: SiteInfo, plan: SitePlan, x: np.ndarray, seed: int = 0, x_original=None) -> Fitted:
    """New weights for the site that reproduce, on rows `x`, what the original network
    computes there: the original's site on `x_original`, its own rows at the same samples and
    positions (by default `x` itself). Fitting the rows a rewritten prefix passes on to the
    original's outputs lets a site repair what the sites before it lost."""
    x = x.astype(np.float64)  # rows are kept in float32: half the memory over all sites
    source = x if x_original is None else x_original.astype(np.float64)
    target, pre = _target(info, source)
    if not info.steps:
        return fit_linear(plan, x, target)
    keep = slice(0, PAPER_ROWS)
    return fit_paper(plan, x[keep], target[keep], pre[keep], info.steps, seed)


def held_out_error(info, plan, fitted, x_seen, target) -> float:
    """Relative error of the site's output on held-out rows it sees (`x_seen`) against
    `target`, what the original computes on the same samples' original rows (`_target`)."""
    return relative_error(predict(info, plan, fitted, x_seen), target)


# ---- the whole model --------------------------------------------------------------------------


@dataclass
class Calibration:
    """One calibration run: the backend, the data split and what the user asked for."""

    backend: Backend
    fit: Samples
    held_out: Samples
    selection: Selection
    min_channels_per_group: int
    targets: Targets = field(default_factory=Targets)
    say: Say = quiet
    seed: int = 0
    distill: Distill = field(default_factory=Distill)
    scores: tuple[str, ...] = ()

    def run(self):
        """Calibrate; return (model, report) with the quality section filled in."""
        self.ladder: list[dict] = []
        self._failed: set = set()
        built = self.backend.build(self.selection, {})
        infos = built.sites
        original = self.backend.original
        self.say(f"reading the inputs of {len(infos)} sites in the original model")
        keys = [i.x_original for i in infos.values()]
        # positions are picked by the site's place in network order, not its name: names in a
        # tf2onnx export depend on what TensorFlow traced before in the process
        self.ids = {name: i for i, name in enumerate(infos)}
        self.x_fit = self._rows(original, self.fit, infos, keys)
        self.x_hold = self._rows(original, self.held_out, infos, keys)
        self.reference = self.backend.run(original, self.held_out)
        selection = self.selection
        if self.targets.auto_groups:
            selection = self._auto_groups(infos, selection)
        model, report, weights = self._sequential(selection)
        model, outputs = self._distilled(model)
        curve = [self._point(report, outputs, [])]
        if self.targets.wanted() and not self.targets.met(outputs):
            model, report, outputs, selection = self._control(
                selection, weights, report, outputs, curve
            )
        if self.targets.auto_groups and self.targets.wanted() and self.targets.met(outputs):
            grown = self._grow(infos, selection, self.weights, curve)
            if grown != selection:
                kept = model, report, outputs, self.distilled
                model, report, _ = self._sequential(grown)
                model, outputs = self._distilled(model)
                curve.append(self._point(report, outputs, []) | {"refitted": True})
                if not self.targets.met(outputs):  # the point before growing held: keep it
                    self.say("refitted whole, the grown rewrite misses the targets: not grown")
                    model, report, outputs, self.distilled = kept
                    curve.append(self._point(report, outputs, []) | {"kept_before_growing": True})
        report.skipped = [_with_shape(s, infos) for s in report.skipped]
        report.quality = Quality(
            len(self.fit), len(self.held_out), True, outputs, self.targets, curve, self.ladder,
            self.distilled,
        )  # fmt: skip
        return model, report

    def _rows(self, model, samples, infos, keys) -> dict[str, np.ndarray]:
        """Rows of the sites' inputs in `model`, at the positions the same sites give in
        every model (`_capture_rows`)."""
        return _capture_rows(self.backend, model, samples, infos, keys, ROWS_PER_SITE, self.ids)

    def _distilled(self, model):
        """(model, held-out outputs), after --distill-steps when asked for."""
        self.distilled: dict = {}
        if not self.distill.steps:
            return model, self._compare(model)
        before = self._compare(model)
        start = time.monotonic()
        self.say(f"distilling the calibrated rewrite on {len(self.fit)} samples")
        model, steps, kept = self.backend.distill(
            model, self.fit, self.held_out, self.distill, self.seed
        )
        outputs = self._compare(model)
        self.distilled = {
            "steps": steps,
            "kept_calibrated": kept,
            "seconds": round(time.monotonic() - start, 1),
            "agreement_before": q.agreement(before),
            "output_error_before": q.output_error(before),
        }
        self.say(
            f"distilled {steps} steps{' (worse: the calibrated weights are kept)' * kept}: "
            f"agreement {q.agreement(before)} -> "
            f"{q.agreement(outputs)}, output error {q.output_error(before):.3f} -> "
            f"{q.output_error(outputs):.3f}"
        )
        return model, outputs

    def _compare(self, model) -> list[q.OutputQuality]:
        return q.compare(
            self.backend.output_names,
            self.reference,
            self.backend.run(model, self.held_out),
            self.scores,
        )

    def _point(self, report, outputs, left: list[str]) -> dict:
        return {
            "trainable_params_after": report.totals.trainable_params_after,
            "reduction_pct": report.totals.reduction_pct,
            "agreement": q.agreement(outputs),
            "output_error": q.output_error(outputs),
            "sites_left": list(left),
        }

    def _auto_groups(self, infos, selection: Selection) -> Selection:
        """Per site the largest group count within the site-error bound (given, or the
        loosest of the ladder at which the targets hold). The bounds come from each site
        fitted alone on the original's inputs, at each group count it allows."""
        errors = {}  # (site, groups) -> held-out error, each fitted once
        for i, (name, info) in enumerate(infos.items(), 1):
            target = _target(info, self.x_hold[name])[0]
            for groups in allowed_groups(
                info.plan.cin, info.plan.filters, self.min_channels_per_group
            ):
                plan = dataclasses.replace(info.plan, groups=groups)
                fitted = solve(info, plan, self.x_fit[name], self.seed)
                error = held_out_error(info, plan, fitted, self.x_hold[name], target)
                errors[name, groups] = (error, fitted)
            found = [f"{g}: {e[0]:.3f}" for (n, g), e in errors.items() if n == name]
            self.say(f"groups {i}/{len(infos)} {name}: held-out error {', '.join(found)}")
        bound = self.targets.max_site_error
        if bound is None and not self.targets.wanted():
            bound = DEFAULT_SITE_ERROR
        if bound is not None:
            return self._grouped(infos, selection, errors, bound)
        return self._ladder(infos, selection, errors)

    def _ladder(self, infos, selection: Selection, errors) -> Selection:
        """The loosest site-error bound at which the targets hold, each bound tried as a whole
        calibration (sites fitted in network order on matched targets, then --distill-steps):
        a bisection over the bounds that give distinct group counts, as a looser bound only
        ever raises group counts or rewrites more sites."""
        trials, seen = [], set()
        for bound in sorted({e for e, _ in errors.values()}, reverse=True):
            trial = self._grouped(infos, selection, errors, bound)
            grouping = tuple(sorted(self._groups_of(infos, trial).items()))
            if grouping not in seen:
                seen.add(grouping)
                trials.append((bound, trial))
        met: dict[int, bool] = {}

        def holds(index: int) -> bool:
            if index not in met:
                bound, trial = trials[index]
                model, report, _ = self._sequential(trial, quiet)
                _, outputs = self._distilled(model)
                met[index] = self.targets.met(outputs)
                self.say(
                    f"site error bound {bound:g}: {report.totals.reduction_pct:.2f}% fewer "
                    f"parameters, agreement {q.agreement(outputs)}, output error "
                    f"{q.output_error(outputs):.3f}"
                )
                point = self._point(report, outputs, []) | {"site_error": round(bound, 6)}
                self.ladder.append(point)
            return met[index]

        low, high = 0, len(trials) - 1  # the first bound that holds lies in [low, high]
        if not holds(high):
            return trials[high][1]
        while low < high:
            middle = (low + high) // 2
            if holds(middle):
                high = middle
            else:
                low = middle + 1
        self.ladder.sort(key=lambda point: -point["site_error"])
        return trials[low][1]

    def _groups_of(self, infos, selection: Selection) -> dict[str, int]:
        left = dict(selection.left)
        chosen = dict(selection.groups)
        return {n: chosen.get(n, i.plan.groups) for n, i in infos.items() if n not in left}

    def _grouped(self, infos, selection: Selection, errors, bound: float) -> Selection:
        groups, left = list(selection.groups), list(selection.left)
        for name, info in infos.items():
            within = [g for (n, g), (e, _) in errors.items() if n == name and e <= bound]
            chosen = max(within, default=None)
            error = min((e for (n, _), (e, _) in errors.items() if n == name), default=np.inf)
            if chosen is None:
                left.append(
                    (
                        name,
                        f"no group count keeps the site error within {bound:g} "
                        f"(best {error:.3f}; --groups auto)",
                    )
                )
            elif chosen != info.plan.groups:
                groups.append((name, chosen))
        return dataclasses.replace(selection, groups=tuple(groups), left=tuple(left))

    def _sequential(self, selection: Selection, say: Say | None = None):
        """Fit each site in network order; each sees the inputs of the original or of the
        rewritten prefix (earlier sites already fitted), whichever holds out better."""
        say = say or self.say
        weights: dict[str, Fitted] = {}
        self.alone: dict[str, Fitted] = {}
        """Each site fitted on the original's inputs: what it does when rewritten alone."""
        built = self.backend.build(selection, weights)
        plans: dict[str, SitePlan] = {}
        names = list(built.sites)
        for i, name in enumerate(names, 1):
            info = built.sites[name]
            xo_fit, xo_hold = self.x_fit[name], self.x_hold[name]
            target = _target(info, xo_hold)[0]
            candidates = {"original": solve(info, info.plan, xo_fit, self.seed)}
            self.alone[name] = candidates["original"]
            # what the rewritten prefix passes on, also for the first site fitted: sites
            # before it that calibration cannot fit (nested, in an ONNX If body...) keep
            # their init. Where it is what the original passes on (nothing rewritten
            # upstream), a second fit would be the first one again.
            one, key = {name: info}, [info.x_rewritten]
            xr_fit = self._rows(built.model, self.fit, one, key)[name]
            xr_hold = self._rows(built.model, self.held_out, one, key)[name]
            if not np.array_equal(xr_fit, xo_fit):
                candidates["rewritten"] = solve(info, info.plan, xr_fit, self.seed, xo_fit)
            scored = {
                k: held_out_error(info, info.plan, f, xr_hold, target)
                for k, f in candidates.items()
            }
            chosen = min(scored, key=scored.get)
            weights[name] = candidates[chosen]
            site_error = held_out_error(info, info.plan, weights[name], xo_hold, target)
            plans[name] = dataclasses.replace(
                info.plan,
                site_error=round(site_error, 6),
                calibrated_on=chosen,
                context_error=round(scored[chosen], 6),
            )
            say(
                f"calibrating site {i}/{len(names)} {name}: error {site_error:.3f}, "
                f"{scored[chosen]:.3f} in context (fitted on the {chosen} inputs)"
            )
            self.backend.update(built, name, weights[name])
        report = built.report
        report.sites = [plans.get(s.name, s) for s in report.sites]
        self.weights_plans = plans
        self.weights = weights
        """The weights of the last fit, site by site (what `built.model` holds)."""
        return built.model, report, weights

    def _control(self, selection, weights, report, outputs, curve):
        """Leave sites as they were, the most damaging first, until the targets hold."""
        ranking = self._rank(selection, weights)
        left: list[str] = []
        for name, damage in ranking:
            left.append(name)
            error = self.weights_plans[name].site_error
            reason = f"kept for agreement (site error {error:.3f})"
            trial = dataclasses.replace(selection, left=selection.left + ((name, reason),))
            selection = trial
            built = self.backend.build(selection, weights)
            outputs = self._compare(built.model)
            curve.append(self._point(built.report, outputs, left) | {"damage_alone": damage})
            self.say(
                f"left {name} as it was: agreement {q.agreement(outputs)}, output error "
                f"{q.output_error(outputs):.3f}"
            )
            if self.targets.met(outputs):
                break
        # the remaining sites see other inputs now: fit them again in that context
        model, report, _ = self._sequential(selection)
        model, outputs = self._distilled(model)
        curve.append(self._point(report, outputs, left) | {"refitted": True})
        return model, report, outputs, selection

    def _grow(self, infos, selection: Selection, weights, curve) -> Selection:
        """Once the targets hold: try each site at its next larger group count (a site left
        as it was at its smallest), the largest saving first, and keep every change under
        which they still hold. A trial refits only the changed site, on what the rewrite
        passes it, to what the original computes there; the result is refitted whole after."""
        weights = dict(weights)
        while True:
            current = self._groups_of(infos, selection)
            tries = []
            for name, info in infos.items():
                allowed = allowed_groups(
                    info.plan.cin, info.plan.filters, self.min_channels_per_group
                )
                now = current.get(name)
                larger = [g for g in allowed if now is None or g > now]
                if not larger:
                    continue
                before = info.plan.params_before if now is None else _params(info.plan, now)
                tries.append((before - _params(info.plan, min(larger)), name, min(larger)))
            changed = False
            for saving, name, groups in sorted(tries, reverse=True):
                if saving <= 0 or (name, groups) in self._failed:
                    continue
                trial = _with_groups(selection, name, groups)
                built = self.backend.build(trial, {n: w for n, w in weights.items() if n != name})
                info = built.sites.get(name)
                if info is None:
                    continue
                x = self._rows(built.model, self.fit, {name: info}, [info.x_rewritten])[name]
                fitted = solve(info, info.plan, x, self.seed, self.x_fit[name])
                self.backend.update(built, name, fitted)
                outputs = self._compare(built.model)
                held = self.targets.met(outputs)
                self.say(
                    f"{name} at {groups} groups: agreement {q.agreement(outputs)}, output "
                    f"error {q.output_error(outputs):.3f}, {'kept' if held else 'undone'}"
                )
                if held:
                    curve.append(self._point(built.report, outputs, []) | {"grown": name})
                    selection, weights[name], changed = trial, fitted, True
                    break  # the savings of the others change with this one: rank again
                self._failed.add((name, groups))
            if not changed:
                return selection

    def _rank(self, selection, weights) -> list[tuple[str, float]]:
        """Each site's damage alone: the loss of agreement (or the output error) of the
        original with only that site rewritten."""
        names = [n for n in weights]
        damage = {}
        for i, name in enumerate(names, 1):
            others = tuple((n, "ranking") for n in names if n != name)
            built = self.backend.build(
                dataclasses.replace(selection, left=selection.left + others), self.alone
            )
            outputs = self._compare(built.model)
            agreement = q.agreement(outputs)
            damage[name] = (
                (1 - agreement)
                if agreement is not None and (self.targets.min_agreement is not None)
                else q.output_error(outputs)
            )
            self.say(f"ranking {i}/{len(names)} {name}: damage alone {damage[name]:.4f}")
        return sorted(damage.items(), key=lambda kv: -kv[1])


def _with_shape(skipped, infos):
    """A site left as it was by calibration keeps its Cin and F in the report."""
    info = infos.get(skipped.name)
    if skipped.cin is not None or info is None:
        return skipped
    return dataclasses.replace(skipped, cin=info.plan.cin, filters=info.plan.filters)


def _params(plan: SitePlan, groups: int) -> int:
    return dataclasses.replace(plan, groups=groups).params_after


def _with_groups(selection: Selection, name: str, groups: int) -> Selection:
    """`selection` with site `name` rewritten at `groups` groups."""
    return dataclasses.replace(
        selection,
        groups=tuple((n, g) for n, g in selection.groups if n != name) + ((name, groups),),
        left=tuple((n, r) for n, r in selection.left if n != name),
    )


def check_runs(backend: Backend, samples: Samples, name: str | None = None) -> None:
    """Run the original on the first samples before anything else: a model that cannot run on
    the user's data (e.g. images kept at their own size where an open input needs multiples of
    32) is a problem of the data, said in one line naming it; outputs that are not finite (a
    NaN weight) are a problem of the model, which no rewrite can be measured against."""
    try:
        outputs = backend.run(backend.original, samples.take(slice(0, 2)))
    except GraphoptError:
        raise
    except Exception as exc:  # the runtime's own error, whatever its class
        raise InputError(
            f"{samples.source}: the original model does not run on these samples: "
            f"{runtime_reason(exc)}"
        ) from None
    for output, array in zip(backend.output_names, outputs):
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise InputError(
                f"{name or 'the original model'}: its output '{output}' is NaN or infinite on "
                f"the first samples of {samples.source}: check the model's weights"
            )


def measure(backend: Backend, model, samples: Samples, scores=()) -> list[q.OutputQuality]:
    """Agreement of `model` with the backend's original on `samples` (no fitting)."""
    return q.compare(
        backend.output_names,
        backend.run(backend.original, samples),
        backend.run(model, samples),
        tuple(scores),
    )


def check_scores(backend: Backend, scores) -> tuple[str, ...]:
    """The outputs named to hold class scores, each one of the model's."""
    unknown = [s for s in scores if s not in backend.output_names]
    if unknown:
        raise UsageError(
            f"--scores {unknown[0]}: the model has no such output (its outputs: "
            f"{', '.join(backend.output_names)})"
        )
    return tuple(scores)
