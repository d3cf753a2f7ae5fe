"""The rules of docs/method.md and their accounting: pure integers, no framework.

A *site* is a pointwise convolution. Its plan says how many *groups* K and L get, the
*interleave* step, whether L exists, and what that costs in parameters and
multiply-accumulates (MACs) before and after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

PAPER = "paper"
LINEAR = "linear"
MODES = (PAPER, LINEAR)
SCRATCH = "scratch"
FIT = "fit"
INITS = (SCRATCH, FIT)
KINDS = ("conv", "separable", "dense", "matmul")
"""What a site was in the model: a 1x1 convolution, the pointwise half of a separable
convolution, a Dense layer on a feature map's channel axis, or an ONNX MatMul/Gemm doing so."""
DEFAULT_MIN_CHANNELS_PER_GROUP = 16


def max_groups(cin: int, filters: int, min_channels_per_group: int) -> int:
    """Largest d <= cin // m dividing both cin and filters (the paper's common divisor)."""
    if cin < 1 or filters < 1 or min_channels_per_group < 1:
        raise ValueError("channel counts and min_channels_per_group must be positive")
    d = max(1, min(cin, filters, cin // min_channels_per_group))
    while d > 1 and (cin % d or filters % d):
        d -= 1
    return d


def allowed_groups(cin: int, filters: int, min_channels_per_group: int) -> list[int]:
    """Every group count the rule allows, largest first: common divisors of cin and filters,
    above 1 and at most cin // m (so each group has at least m input channels)."""
    top = max_groups(cin, filters, min_channels_per_group)
    return [d for d in range(top, 1, -1) if cin % d == 0 and filters % d == 0]


def interleave_permutation(channels: int, groups: int) -> list[int]:
    """Source channel of each output channel: output j*N + i takes input i*s + j."""
    step = channels // groups
    return [i * step + j for j in range(step) for i in range(groups)]


@dataclass(frozen=True)
class SitePlan:
    """What replaces one pointwise convolution, and what it costs."""

    name: str
    cin: int
    filters: int
    groups: int
    use_bias: bool
    positions: int | None = None
    """Output positions per sample (H*W...), None when the model's shape leaves it open."""
    l_norm_params: int = 0
    """Parameters of the normalisation added for L in paper mode (0 when none)."""
    l_norm_trainable: int = 0
    runs_folded: bool = False
    """ONNX, --fold-slower: the model holds K and L, but the site runs as one dense conv that
    onnxruntime computes from them when it loads the model (its MACs are the original's)."""
    fit_error: float | None = None
    """--init fit: ||W - (I + L P) K|| / ||W|| of the fitted K and L (None: scratch init)."""
    site_error: float | None = None
    """--calibrate: relative L2 error of the site's output against the original's on held-out
    samples (same inputs); None when the site was not calibrated."""
    calibrated_on: str | None = None
    """--calibrate: whose activations the site was fitted on, "original" or "rewritten" (the
    rewritten prefix), whichever gave the smaller held-out error."""
    context_error: float | None = None
    """--calibrate: relative L2 error of the site's output inside the rewritten model (its
    inputs from the rewritten prefix, the earlier sites calibrated) against the original's
    output, on held-out samples: what the site passes on, drift from upstream included. Where
    `site_error` judges the site alone, this one can be larger (drift) or smaller (a site
    fitted on the rewritten inputs corrects some of it)."""
    kind: str = "conv"
    """One of KINDS: the layer or node the site replaces (the rules are the same for all)."""

    @property
    def interleave_step(self) -> int:
        return self.filters // self.groups

    @property
    def has_interleave(self) -> bool:
        return self.interleave_step > 1

    @property
    def has_l(self) -> bool:
        return self.cin >= self.filters

    @property
    def k_params(self) -> int:
        return self.cin * self.filters // self.groups + (self.filters if self.use_bias else 0)

    @property
    def l_params(self) -> int:
        if not self.has_l:
            return 0
        return self.filters * self.filters // self.groups + (self.filters if self.use_bias else 0)

    @property
    def params_before(self) -> int:
        return self.cin * self.filters + (self.filters if self.use_bias else 0)

    @property
    def params_after(self) -> int:
        return self.k_params + self.l_params + self.l_norm_params

    @property
    def saves(self) -> bool:
        """Whether the replacement holds fewer parameters than the conv (docs/method.md,
        "Sites that save nothing"); with Cin = F and two groups it does not."""
        return self.params_after < self.params_before

    @property
    def trainable_after(self) -> int:
        return self.k_params + self.l_params + self.l_norm_trainable

    @property
    def macs_before(self) -> int | None:
        return None if self.positions is None else self.positions * self.cin * self.filters

    @property
    def macs_after(self) -> int | None:
        if self.positions is None or self.runs_folded:
            return self.macs_before
        per_position = self.cin * self.filters // self.groups
        if self.has_l:
            per_position += self.filters * self.filters // self.groups
        return self.positions * per_position

    def as_dict(self) -> dict:
        data = asdict(self)
        for key in (
            "interleave_step",
            "has_l",
            "params_before",
            "params_after",
            "macs_before",
            "macs_after",
            "k_params",
            "l_params",
            "saves",
        ):
            data[key] = getattr(self, key)
        return data


@dataclass(frozen=True)
class Skipped:
    """A pointwise convolution (or candidate) left as it is, and why."""

    name: str
    reason: str
    cin: int | None = None
    filters: int | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def plan_site(
    name: str,
    cin: int,
    filters: int,
    *,
    use_bias: bool,
    min_channels_per_group: int = DEFAULT_MIN_CHANNELS_PER_GROUP,
    positions: int | None = None,
    l_norm_per_channel: tuple[int, int] = (0, 0),
    groups: int | None = None,
    mode: str = PAPER,
    kind: str = "conv",
) -> SitePlan | Skipped:
    """Plan one site; `l_norm_per_channel` is (all, trainable) parameters per channel of L's BN;
    `groups` overrides the rule's choice (a common divisor of cin and filters, see
    `allowed_groups`). `linear` mode skips a site that saves nothing; `paper` mode rewrites it,
    as the paper did."""
    if groups is None:
        groups = max_groups(cin, filters, min_channels_per_group)
    elif groups < 1 or cin % groups or filters % groups:
        raise ValueError(f"{name}: {groups} groups do not divide Cin={cin} and F={filters}")
    if groups <= 1:
        return Skipped(
            name,
            f"only one group possible (Cin={cin}, F={filters}, m={min_channels_per_group})",
            cin,
            filters,
        )
    has_l = cin >= filters
    norm_all, norm_trainable = l_norm_per_channel if has_l else (0, 0)
    plan = SitePlan(
        name=name,
        cin=cin,
        filters=filters,
        groups=groups,
        use_bias=use_bias,
        positions=positions,
        l_norm_params=norm_all * filters,
        l_norm_trainable=norm_trainable * filters,
        kind=kind,
    )
    if mode == LINEAR and not plan.saves:
        return Skipped(
            name,
            f"no saving ({plan.params_before:,} parameters before, {plan.params_after:,} after)",
            cin,
            filters,
        )
    return plan


@dataclass(frozen=True)
class Selection:
    """Which sites the user wants rewritten and how: --include/--exclude globs, --keep-last N,
    sites left as they were by calibration (with the reason), and per-site group counts."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_last: int = 0
    kept: frozenset[str] = frozenset()
    """The last `keep_last` site names, found by a first pass over the model."""
    left: tuple[tuple[str, str], ...] = ()
    """(site name, reason) of sites left as they were by a decision other than the globs."""
    groups: tuple[tuple[str, int], ...] = ()
    """(site name, groups) where a site takes other groups than the rule's (--groups auto)."""

    def groups_for(self, name: str) -> int | None:
        return dict(self.groups).get(name)

    def skip_reason(self, name: str) -> str | None:
        left = dict(self.left).get(name)
        if left:
            return left
        if self.include and not any(fnmatchcase(name, p) for p in self.include):
            return f"not matched by --include {' '.join(self.include)}"
        for pattern in self.exclude:
            if fnmatchcase(name, pattern):
                return f"matched by --exclude {pattern}"
        if name in self.kept:
            return f"kept by --keep-last {self.keep_last}"
        return None


EVERY_SITE = Selection()
