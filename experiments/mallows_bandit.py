"""MallowsPO's synthetic bandit (ALGORITHMS.md §2, "The synthetic bandit"): DPO vs MallowsPO-θ vs -ϕ.

Four arms with the central ranking y1 ≻ y2 ≻ y3 ≻ y4 and two contexts of different dispersion, ϕ = 0.05
("clear") and ϕ = 0.7 ("contested"). Each context gets `comparisons` labelled pairs (8 by default, 16 in
all) whose labels are drawn from the exact Mallows–Kendall probability g_ϕ(Δ) that the arm Δ places higher
wins. A tabular softmax policy per context starts at the uniform reference and is trained by full-batch
gradient descent on each loss from `rayalign.core.losses`; we record the policy's entropy, its KL to the
reference, the fitted reward gaps β·log π(y_i)/π_ref(y_i) between adjacent arms, and whether the central
ranking is recovered.

Time scale: the paper trains 500k epochs at lr 5e-3. Full-batch gradient descent with a step far below
1/curvature (here ≲ 0.05) follows the gradient flow, so what matters is lr × epochs: the default (lr 2.5,
1,000 epochs) covers the same lr × epochs = 2,500 in seconds. Checked on 20 seeds: its fitted reward gaps
agree with the literal recipe (`--lr 5e-3 --epochs 500000`, half an hour) to 1.2e-3 and its entropies to
0.6% (lr 1.0 × 2,500 epochs: 5e-4 and 0.3%).

Run from the repository root:  python -m experiments.mallows_bandit [--epochs N] [--seed S] [--out DIR]
Not here: no LLM, no Ray, no config files; the losses are imported, never re-implemented.
"""

import argparse
import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from rayalign.core.losses import dpo_loss, mallows_phi_loss, mallows_theta_loss
from rayalign.core.metrics import kl_divergence

N_ARMS = 4
CONTEXTS = ("clear", "contested")
PHIS = (0.05, 0.7)  # dispersion ϕ(x) of each context
METHODS = ("dpo", "mallows_theta", "mallows_phi")
DEFAULT_OUT = Path("runs/experiments/mallows_bandit")
# lr × epochs = 2,500, the paper's 5e-3 × 500k (see the module docstring); shared by run_bandit and the CLI.
DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_SEEDS = 1000, 2.5, 5
# Arms whose log-probs differ by less than this count as tied (symmetric data leaves rounding noise).
TIE_TOLERANCE = 1e-6


def mallows_pairwise_prob(delta: int, phi: float) -> float:
    """g_ϕ(Δ) = h(Δ+1) − h(Δ), h(k) = k / (1 − ϕ^k): the exact Mallows–Kendall probability that the arm
    Δ ≥ 1 places higher in the central ranking is preferred (independent of the number of arms)."""
    return (delta + 1) / (1.0 - phi ** (delta + 1)) - delta / (1.0 - phi**delta)


def sample_comparisons(comparisons: int, seeds: list[int]) -> dict[str, torch.Tensor]:
    """Labelled pairs for every seed: `context, winner, loser`, each (S, N) with N = 2 × comparisons.

    The pairs of a context cycle through all 6 arm pairs in a seeded random order (a balanced design, so
    with 8 comparisons every pair is labelled at least once); arm i < j (i ranked higher) wins with
    probability g_ϕ(j − i).
    """
    all_pairs = [(i, j) for i in range(N_ARMS) for j in range(i + 1, N_ARMS)]
    rows = {"context": [], "winner": [], "loser": []}
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        context, winner, loser = [], [], []
        for c, phi in enumerate(PHIS):
            order = torch.randperm(len(all_pairs), generator=gen).tolist()
            for n in range(comparisons):
                i, j = all_pairs[order[n % len(all_pairs)]]
                higher_wins = torch.rand((), generator=gen).item() < mallows_pairwise_prob(j - i, phi)
                context.append(c)
                winner.append(i if higher_wins else j)
                loser.append(j if higher_wins else i)
        for key, values in zip(rows, (context, winner, loser)):
            rows[key].append(values)
    return {key: torch.tensor(values) for key, values in rows.items()}


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore the caller's setting. Tensors of a few hundred elements
    cost more to hand to a thread pool than to compute (10-30× slower when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _method_losses(method: str, chosen: torch.Tensor, rejected: torch.Tensor, ref: torch.Tensor,
                   phi: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-comparison losses (B,) of one method; `phi` is each comparison's context dispersion (B,)."""
    if method == "dpo":
        return dpo_loss(chosen, rejected, ref, ref, beta=beta).losses
    if method == "mallows_theta":
        # The oracle dispersion: k = −ln ϕ(x), the true value rather than an entropy estimate.
        return mallows_theta_loss(chosen, rejected, ref, ref, beta=beta, neg_log_dispersion=-phi.log()).losses
    if method == "mallows_phi":
        return mallows_phi_loss(chosen, rejected, ref, ref, beta=beta, phi=phi).losses
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def population_gaps(*, beta: float = 0.1) -> dict[str, dict[str, list[float]]]:
    """Adjacent reward gaps r_i − r_{i+1} each method converges to with infinitely many comparisons.

    Minimises the expected loss over all 6 pairs (equally often, as the balanced design gives), each
    labelled i ≻ j with probability g_ϕ(j − i), over rewards r = β·log π/π_ref (damped Newton). MallowsPO-ϕ's
    link is the true label model, so it recovers the rank gaps exactly (1, 1, 1); DPO's gaps are roughly
    −ln ϕ (its per-pair optimum logit g_ϕ(Δ) is −ln ϕ for Δ = 1 but less than −Δ·ln ϕ for Δ > 1).
    """
    pairs = [(i, j) for i in range(N_ARMS) for j in range(i + 1, N_ARMS)]
    gaps: dict[str, dict[str, list[float]]] = {method: {} for method in METHODS}
    for name, phi in zip(CONTEXTS, PHIS):
        g = torch.tensor([mallows_pairwise_prob(j - i, phi) for i, j in pairs], dtype=torch.float64)
        for method in METHODS:
            with _single_thread():
                rewards = _fit_expected_loss(method, pairs, g, phi, beta)
            gaps[method][name] = (rewards[:-1] - rewards[1:]).tolist()
    return gaps


def _fit_expected_loss(method: str, pairs: list[tuple[int, int]], g: torch.Tensor, phi: float,
                       beta: float) -> torch.Tensor:
    """Rewards (A,) minimising mean_pairs [g·loss(i ≻ j) + (1 − g)·loss(j ≻ i)] for one method, by damped
    Newton on the three adjacent gaps (rewards are defined up to a shift). torch.optim is avoided on
    purpose: its first step imports torch._dynamo, seconds for a 3-parameter problem."""
    higher, lower = torch.tensor(pairs).T
    ref = torch.zeros(len(pairs), dtype=torch.float64)
    phis = torch.full_like(g, phi)

    def expected_loss(gaps: torch.Tensor) -> torch.Tensor:
        logps = torch.cat([gaps.new_zeros(1), -gaps.cumsum(0)]) / beta  # β·(log π − log π_ref) = rewards
        wins = _method_losses(method, logps[higher], logps[lower], ref, phis, beta)
        losses = _method_losses(method, logps[lower], logps[higher], ref, phis, beta)
        return (g * wins + (1 - g) * losses).mean()

    # Start off s = 0, where MallowsPO-ϕ's link jumps (the loss is lowest exactly at 0, where both orders
    # of a pair use the s > 0 branch); a step across the jump raises the loss and backtracking refuses it.
    gaps = torch.full((N_ARMS - 1,), 0.5, dtype=torch.float64)
    for _ in range(100):
        value = expected_loss(gaps)
        grad = torch.autograd.functional.jacobian(expected_loss, gaps)
        if grad.abs().max() < 1e-12:
            break
        hess = torch.autograd.functional.hessian(expected_loss, gaps)
        chol, info = torch.linalg.cholesky_ex(hess)
        step = torch.cholesky_solve(grad.unsqueeze(1), chol).squeeze(1) if info == 0 else grad
        t = 1.0
        while expected_loss(gaps - t * step) > value - 1e-4 * t * (grad @ step) and t > 1e-12:
            t /= 2  # Armijo backtracking
        gaps = gaps - t * step
    return torch.cat([gaps.new_zeros(1), -gaps.cumsum(0)])


def _snapshot(logits: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Policy statistics for logits (M, S, C, A): policy, entropy, KL to the uniform reference, and the
    fitted reward gaps r_i − r_{i+1} with r_i = β·log π(y_i)/π_ref(y_i) (the reference cancels)."""
    logp = torch.log_softmax(logits, dim=-1)
    policy = logp.exp()
    ref = torch.full_like(policy, 1.0 / N_ARMS)
    rewards = beta * logp
    return {
        "policy": policy,
        "entropy": -(torch.xlogy(policy, policy)).sum(-1),
        "kl": kl_divergence(policy, ref),
        "reward_gaps": rewards[..., :-1] - rewards[..., 1:],
    }


def train(data: dict[str, torch.Tensor], *, epochs: int, lr: float, beta: float,
          record_every: int) -> tuple[torch.Tensor, dict[str, list]]:
    """Full-batch gradient descent of all methods and seeds at once; returns final logits (M, S, C, A)
    and the recorded history. Each seed's loss is the mean over its 2 × comparisons pairs; methods and
    seeds have separate parameters, so summing their losses keeps their gradients independent."""
    context, winner, loser = data["context"], data["winner"], data["loser"]
    n_seeds = context.shape[0]
    # Flat indices into one method's (S, C, A) logits, so one gather serves all methods each step.
    row = (torch.arange(n_seeds).unsqueeze(1) * len(CONTEXTS) + context) * N_ARMS
    winner_index, loser_index = (row + winner).reshape(-1), (row + loser).reshape(-1)
    phi = torch.tensor(PHIS, dtype=torch.float64)[context].reshape(-1)
    ref = torch.full_like(phi, math.log(1.0 / N_ARMS))
    # float64: at lr 5e-3 a step moves a logit by ~1e-5, below float32 resolution once logits reach ~30.
    logits = torch.zeros(len(METHODS), n_seeds, len(CONTEXTS), N_ARMS, dtype=torch.float64,
                         requires_grad=True)
    history = {"epoch": [], "entropy": [], "kl": [], "reward_gaps": []}
    for epoch in range(epochs + 1):
        if epoch % record_every == 0 or epoch == epochs:
            snap = _snapshot(logits.detach(), beta)
            history["epoch"].append(epoch)
            for key in ("entropy", "kl", "reward_gaps"):
                history[key].append(snap[key])
        if epoch == epochs:
            break
        logp = torch.log_softmax(logits, dim=-1).reshape(len(METHODS), -1)
        chosen, rejected = logp[:, winner_index], logp[:, loser_index]  # (M, S·N)
        total = logits.new_zeros(())
        for m, method in enumerate(METHODS):
            losses = _method_losses(method, chosen[m], rejected[m], ref, phi, beta)
            total = total + losses.reshape(n_seeds, -1).mean(dim=1).sum()
        logits.grad = None
        total.backward()
        with torch.no_grad():
            logits -= lr * logits.grad
    return logits.detach(), history


def _ranking_recovered(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(central ranking recovered, top arm recovered) for logits (..., A), arms in central order. Strict:
    arms closer than TIE_TOLERANCE in log-prob are tied, and a tie does not recover their order."""
    descending = logits[..., :-1] - logits[..., 1:] > TIE_TOLERANCE
    top = (logits[..., :1] - logits[..., 1:] > TIE_TOLERANCE).all(-1)
    return descending.all(-1), top


def run_bandit(*, epochs: int = DEFAULT_EPOCHS, seed: int = 0, n_seeds: int = DEFAULT_SEEDS,
               lr: float = DEFAULT_LR, beta: float = 0.1, comparisons: int = 8,
               record_every: int | None = None, out: Path | str | None = None) -> dict:
    """Train DPO, MallowsPO-θ and MallowsPO-ϕ on the bandit for seeds seed .. seed+n_seeds−1.

    Returns `final[method][context]` with per-seed lists: `policy` (A probabilities), `entropy`, `kl`,
    `reward_gaps` (adjacent, y1−y2, y2−y3, y3−y4), `ranking_recovered`, `top_recovered`; also the
    `history` tensors (T, M, S, C[, ...]), the labelled `data`, and `png`, the plot path when `out` is set.
    """
    seeds = list(range(seed, seed + n_seeds))
    data = sample_comparisons(comparisons, seeds)
    record_every = record_every or max(1, epochs // 200)
    start = time.perf_counter()
    with _single_thread():
        logits, history = train(data, epochs=epochs, lr=lr, beta=beta, record_every=record_every)
    seconds = time.perf_counter() - start
    snap = _snapshot(logits, beta)
    ranking, top = _ranking_recovered(logits)
    final = {}
    for m, method in enumerate(METHODS):
        final[method] = {}
        for c, name in enumerate(CONTEXTS):
            final[method][name] = {
                "policy": snap["policy"][m, :, c].tolist(),
                "entropy": snap["entropy"][m, :, c].tolist(),
                "kl": snap["kl"][m, :, c].tolist(),
                "reward_gaps": snap["reward_gaps"][m, :, c].tolist(),
                "ranking_recovered": ranking[m, :, c].tolist(),
                "top_recovered": top[m, :, c].tolist(),
            }
    result = {
        "config": {"epochs": epochs, "seeds": seeds, "lr": lr, "beta": beta, "comparisons": comparisons,
                   "phis": dict(zip(CONTEXTS, PHIS)), "train_seconds": seconds},
        "final": final,
        "history": {"epoch": history["epoch"],
                    **{key: torch.stack(history[key]) for key in ("entropy", "kl", "reward_gaps")}},
        "data": data,
        "population_gaps": population_gaps(beta=beta),
        "png": None,
    }
    if out is not None:
        result["png"] = plot_curves(result, Path(out) / "mallows_bandit.png")
    return result


def plot_curves(result: dict, path: Path) -> Path:
    """Entropy, KL to the reference and mean adjacent reward gap over epochs: one column per context,
    one line per method (the mean over seeds, with the min–max band when there are several)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on workers or CI
    import matplotlib.pyplot as plt

    hist, cfg = result["history"], result["config"]
    epochs = hist["epoch"]
    mean_gap = hist["reward_gaps"].mean(-1)  # (T, M, S, C): (r1 − r4) / 3
    rows = (("entropy", hist["entropy"], "policy entropy (nats)"), ("kl", hist["kl"], "KL(π ‖ π_ref) (nats)"),
            ("gap", mean_gap, "mean adjacent reward gap"))
    fig, axes = plt.subplots(len(rows), len(CONTEXTS), figsize=(11, 10), sharex=True)
    for r, (key, values, label) in enumerate(rows):
        for c, (name, phi) in enumerate(zip(CONTEXTS, PHIS)):
            ax = axes[r, c]
            for m, method in enumerate(METHODS):
                series = values[:, m, :, c]
                ax.plot(epochs, series.mean(-1), label=method, color=f"C{m}")
                if series.shape[-1] > 1:
                    ax.fill_between(epochs, series.min(-1).values, series.max(-1).values, color=f"C{m}",
                                    alpha=0.15)
            if key == "entropy":
                ax.set_yscale("log")  # collapsed policies differ by orders of magnitude near 0
            if key == "gap":  # where each method's gaps go with infinitely many comparisons
                for m, method in enumerate(METHODS):
                    optimum = sum(result["population_gaps"][method][name]) / (N_ARMS - 1)
                    ax.axhline(optimum, color=f"C{m}", ls=":", lw=1.2)
                ax.plot([], [], color="grey", ls=":", label="population optimum")
            if r == 0:
                ax.set_title(f"{name} context (ϕ = {phi})")
            if c == 0:
                ax.set_ylabel(label)
            if r == len(rows) - 1:
                ax.set_xlabel(f"epoch (full batch, lr {cfg['lr']:g}; lr × epochs = {_time(cfg):g})")
            ax.grid(alpha=0.3)
    axes[0, 0].axhline(math.log(N_ARMS), color="grey", ls=":", lw=1)
    axes[-1, 0].legend(fontsize=8)
    axes[0, 1].legend(fontsize=8)
    seeds = cfg["seeds"]
    seed_text = f"seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    fig.suptitle(f"MallowsPO bandit: {cfg['comparisons']} comparisons per context, β = {cfg['beta']}, "
                 f"{seed_text}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time(cfg: dict) -> float:
    """Gradient-flow time lr × epochs: runs with equal values are equivalent (module docstring)."""
    return cfg["lr"] * cfg["epochs"]


def format_table(result: dict) -> str:
    """The final numbers as a fixed-width table (means over seeds; recovery counted over seeds), with
    the population optimum of the mean adjacent gap for comparison."""
    cfg = result["config"]
    n = len(cfg["seeds"])
    head = (f"{'method':<14}{'context':<11}{'policy (y1..y4)':<29}{'entropy':>8}{'KL':>8}"
            f"{'gaps y1-2, y2-3, y3-4':>24}{'optimum':>9}{'ranking':>9}{'top':>5}")
    lines = [head, "-" * len(head)]
    for method in METHODS:
        for name in CONTEXTS:
            f = result["final"][method][name]
            policy = [sum(col) / n for col in zip(*f["policy"])]  # means over seeds
            gaps = [sum(col) / n for col in zip(*f["reward_gaps"])]
            optimum = sum(result["population_gaps"][method][name]) / (N_ARMS - 1)
            lines.append(
                f"{method:<14}{name:<11}{' '.join(f'{p:.4f}' for p in policy):<29}"
                f"{sum(f['entropy']) / n:>8.4f}{sum(f['kl']) / n:>8.4f}"
                f"{', '.join(f'{g:.3f}' for g in gaps):>24}{optimum:>9.3f}"
                f"{sum(f['ranking_recovered']):>7}/{n}{sum(f['top_recovered']):>3}/{n}")
    return "\n".join(lines)


def format_directions(result: dict) -> str:
    """Per seed, how often DPO's policy is the more collapsed one (lower entropy) and has the larger mean
    adjacent reward gap, against each MallowsPO variant, per context."""
    n = len(result["config"]["seeds"])
    lines = []
    for name in CONTEXTS:
        final = {method: result["final"][method][name] for method in METHODS}
        mean_gap = {method: [sum(g) / len(g) for g in final[method]["reward_gaps"]] for method in METHODS}
        parts = []
        for other in METHODS[1:]:
            lower = sum(a < b for a, b in zip(final["dpo"]["entropy"], final[other]["entropy"]))
            larger = sum(a > b for a, b in zip(mean_gap["dpo"], mean_gap[other]))
            parts.append(f"vs {other}: lower entropy {lower}/{n}, larger gap {larger}/{n}")
        lines.append(f"DPO in the {name} context " + "; ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="full-batch steps")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="SGD step; lr × epochs sets the time")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--comparisons", type=int, default=8, help="labelled pairs per context (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="first seed for the labels")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="number of seeds, trained together")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the PNG")
    args = parser.parse_args(argv)
    result = run_bandit(epochs=args.epochs, seed=args.seed, n_seeds=args.seeds, lr=args.lr, beta=args.beta,
                        comparisons=args.comparisons, out=args.out)
    cfg = result["config"]
    print(f"MallowsPO bandit: epochs {cfg['epochs']}, lr {cfg['lr']:g} (lr × epochs = {_time(cfg):g}),"
          f" β {cfg['beta']}, {cfg['comparisons']} comparisons per context, seeds {cfg['seeds']}, "
          f"{cfg['train_seconds']:.1f} s")
    print("optimum = mean adjacent reward gap with infinitely many comparisons (−ln ϕ = "
          + ", ".join(f"{-math.log(phi):.3f} {name}" for name, phi in zip(CONTEXTS, PHIS)) + ")")
    print(format_table(result))
    print(format_directions(result))
    print(f"plot: {result['png']}")
    return result


if __name__ == "__main__":
    main()
