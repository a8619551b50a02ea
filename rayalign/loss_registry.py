"""The one table of losses: every `loss.type`, its function, what it trains on and what it needs.

Everything else that asks "which losses ..." derives the answer from `LOSSES`: the config's names and
checks (`rayalign.config`), the trainers' dispatch (`rayalign.objective` binds each row's `function`, a
name in `rayalign.core.losses`, and builds its keyword arguments from the row), the log-prob reduction the
step passes, whether the reference scoring keeps entropies, and the driver's choice of data kind. It is
torch-free so the config can import it; it holds no math.

Adding a loss touches its function and one row. SimPO (Meng et al. 2024) as the example:

1. the function, in `rayalign/core/losses.py` (SimPO has no reference model: it ignores the reference
   log-probs it is given, and is defined on per-token mean log-probs):

       def simpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                      beta: float = 2.0, gamma: float = 0.5) -> LossOutput:
           _check_beta(beta)
           margins = policy_chosen_logps - policy_rejected_logps
           losses = -F.logsigmoid(beta * margins - gamma)
           return LossOutput(losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach())

2. one row in `LOSSES` below:

       LossSpec("simpo", "simpo_loss", logps=MEAN),

   and its name in ALGORITHMS.md §7 (`tests/test_loss_registry.py` ties the table to that list). A new
   hyper-parameter (say SimPO's gamma from the config) is a `LossConfig` field plus an `options` entry,
   `options=(("beta", "beta"), ("gamma", "simpo_gamma"))`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayalign.data_kind import BELIEFS, GROUPS, PAIRS

SUM, MEAN = "sum", "mean"  # sequence log-prob reductions: summed over completion tokens, or per-token mean
THETA, PHI = "theta", "phi"  # how a MallowsPO loss takes the dispersion: k itself, or phi = exp(-k)


@dataclass(frozen=True)
class LossSpec:
    """One `loss.type`."""

    name: str
    function: str  # its function in rayalign.core.losses
    data: str = PAIRS  # what it trains on (rayalign.data_kind): PAIRS, BELIEFS or GROUPS
    logps: str = SUM  # the sequence log-probs it takes: SUM or MEAN (per-token mean, e.g. IPO as in TRL)
    # keyword argument of the function -> LossConfig field it comes from
    options: tuple[tuple[str, str], ...] = (("beta", "beta"),)
    # default epsilon when loss.label_smoothing is null; None: the loss takes no label smoothing
    label_smoothing: float | None = None
    smoothing_positive: bool = False  # epsilon = 0 is invalid (EXO's log epsilon)
    per_example_smoothing: bool = False  # takes a (B,) epsilon tensor (SPA's soft labels: spa.refine)
    dispersion: str | None = None  # MallowsPO's per-pair dispersion from the reference entropies: THETA or PHI

    @property
    def is_group(self) -> bool:
        return self.data == GROUPS


_GROUP_OPTIONS = (("beta_pi", "beta"), ("beta_r", "beta_r"))

LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("dpo", "dpo_loss", label_smoothing=0.0, per_example_smoothing=True),
    LossSpec("ipo", "ipo_loss", logps=MEAN),
    LossSpec("hinge", "hinge_loss"),
    # 1e-3: the EXO paper's and TRL's epsilon (ALGORITHMS.md §4)
    LossSpec("exo_pref", "exo_pref_loss", label_smoothing=1e-3, smoothing_positive=True),
    LossSpec("exo_rw", "exo_rw_loss", data=GROUPS, options=_GROUP_OPTIONS),
    LossSpec("dpo_rw", "dpo_rw_loss", data=GROUPS, options=_GROUP_OPTIONS),
    LossSpec("mallows_theta", "mallows_theta_loss", label_smoothing=0.0, dispersion=THETA),
    LossSpec("mallows_phi", "mallows_phi_loss", dispersion=PHI),
    LossSpec("gdpo", "gdpo_loss", data=BELIEFS, options=(
        ("beta", "beta"), ("calibration_weight", "gdpo_calibration_weight"),
        ("belief_nll_weight", "gdpo_belief_nll_weight"))),
)}

LOSS_TYPES = tuple(LOSSES)
PAIR_LOSSES = tuple(name for name, spec in LOSSES.items() if not spec.is_group)
GROUP_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.is_group)
SOFT_LABEL_LOSSES = tuple(name for name, spec in LOSSES.items() if spec.per_example_smoothing)
# The LossConfig keys `needs_dispersion` reads: a sweep over them can change the reference cache.
DISPERSION_KEYS = ("loss.type", "loss.mallows_phi")


def uses_mean_logps(loss_type: str) -> bool:
    """Whether the loss takes per-token mean log-probs (IPO, as in TRL) rather than sums."""
    return LOSSES[loss_type].logps == MEAN


def needs_dispersion(loss) -> bool:
    """Whether `loss` (a LossConfig) needs MallowsPO's neg-log dispersion from the reference entropies:
    always for THETA; for PHI only with `loss.mallows_phi=entropy` (a number is used as phi itself)."""
    form = LOSSES[loss.type].dispersion
    return form == THETA or (form == PHI and loss.mallows_phi == "entropy")
