"""SamS (arXiv 2506.17252): batch-wise sample scheduling as a contextual bandit (spec/ALGORITHMS.md §6).

What is here: the per-pair context (`context_features`), the rewards (`sample_rewards`, `batch_reward`,
`combined_reward`), the selection rule (`num_selected`, `select_top_k`), the networks (`Encoder`, the
residual MLP behind f_S and f_S′, `pool_hidden`) and `SamsScheduler`, which owns the networks, one Adam,
the replay pool, the lagged record of the previous round and a private RNG, and checkpoints all of it.

What is not: the policy forward, the loss, the reduction over the selected pairs, gathering across
workers or broadcasting the indices (the trainer does these on rank 0), and any configuration object.
The scheduler runs on the CPU: at the sizes it is built for its work is a few small matrix products, and a
CPU state checkpoints and resumes without device maps. Torch and the standard library only.
"""

import contextlib
import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Encoder",
    "ResidualMLP",
    "SamsScheduler",
    "SamsSelection",
    "batch_reward",
    "combined_reward",
    "context_features",
    "num_selected",
    "pool_hidden",
    "sample_rewards",
    "select_top_k",
]

POOL_WIDTH = 4  # f_S′ sees f_S's hidden activations block-mean-pooled by 4 (spec §6 step 3)


# ---------------------------------------------------------------- context, rewards, selection


def context_features(hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-pair context: each transformer block's output averaged over real tokens and over chosen/rejected.

    `hidden_states`: the tuple of an HF model called with `output_hidden_states=True` on a concatenated
    [chosen; rejected] batch, each (2B, T, D); index 0 is the embedding output and is **skipped** (it holds
    token identities, not the policy's state), so L = len(hidden_states) − 1 blocks are used (the last one
    as HF returns it, after the final norm). `attention_mask`: (2B, T), 1 on prompt+completion tokens.
    Returns (B, L, D), detached, float32 (float64 kept). Real tokens only: the authors' code also averages
    padded positions, which makes the context depend on the padding length.
    """
    blocks = hidden_states[1:]
    if not blocks:
        raise ValueError("context_features needs the embeddings plus at least one block's hidden states")
    if attention_mask.shape[0] % 2:
        raise ValueError(f"expected a concatenated [chosen; rejected] batch, got {attention_mask.shape[0]} rows")
    keep = attention_mask.bool().unsqueeze(-1)  # (2B, T, 1)
    count = keep.sum(dim=1).clamp(min=1)
    means = []
    for hidden in blocks:
        hidden = hidden.detach()
        hidden = hidden.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        # where, not a product: padded positions may hold NaN/inf (fully masked attention rows).
        means.append(torch.where(keep, hidden, torch.zeros_like(hidden)).sum(dim=1) / count.to(hidden.dtype))
    chosen, rejected = torch.stack(means, dim=1).chunk(2)
    return (chosen + rejected) / 2


def _minmax(values: torch.Tensor) -> torch.Tensor:
    return (values - values.min()) / (values.max() - values.min() + 1e-8)


def sample_rewards(margins: torch.Tensor, chosen_logps: torch.Tensor, *, delta: float) -> torch.Tensor:
    """r_S,i = δ·g(m_i) + (1−δ)·g(−logp_θ(y_w,i)), g(v) = (v − min v)/(max v − min v + 1e-8) over the batch.

    SamS paper, sample-level reward: a larger DPO margin m = u and a less likely chosen answer (higher
    uncertainty) score higher. Shapes (n,), (n,) -> (n,) in [0, 1]. Inputs are detached.
    Also the "top-K by r_S computed directly" baseline: `select_top_k(sample_rewards(...), ratio=ρ)`.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    return delta * _minmax(margins.detach()) + (1 - delta) * _minmax(-chosen_logps.detach())


def batch_reward(prev_mean_loss: float | torch.Tensor, mean_loss: float | torch.Tensor) -> torch.Tensor:
    """r_B = (A − B)/max(A, B), A = exp(mean ℓ of the previous batch), B = exp(mean ℓ of this batch).

    Our definition (spec §6; the released code uses a smoothed mean of −σ(u)). In (−1, 1), positive when
    the loss went down. Computed from the gap d = prev − cur as sign(d)·(1 − e^{−|d|}), which equals the
    formula and cannot overflow for large losses. Scalars in, a 0-dim float64 tensor out.
    """
    gap = torch.as_tensor(prev_mean_loss, dtype=torch.float64) - torch.as_tensor(mean_loss, dtype=torch.float64)
    return torch.sign(gap) * -torch.expm1(-gap.abs())


def combined_reward(r_b: float | torch.Tensor, r_s: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """r_i = γ·σ(r_B) + (1−γ)·σ(r_S,i): the batch reward r_b (a scalar) and r_s (n,) -> (n,) in r_s's dtype."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    batch_term = torch.sigmoid(torch.as_tensor(r_b, dtype=r_s.dtype, device=r_s.device))
    return gamma * batch_term + (1 - gamma) * torch.sigmoid(r_s)


def num_selected(n: int, *, ratio: float) -> int:
    """K = ⌈ρ·n⌉, at least 1. The 1e-9 keeps products like 0.7·10 = 7.000000000000001 from rounding up."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if n < 1:
        raise ValueError(f"need at least one pair, got n={n}")
    return min(n, max(1, math.ceil(ratio * n - 1e-9)))


def select_top_k(scores: torch.Tensor, *, ratio: float) -> torch.Tensor:
    """Indices of the K = ⌈ρ·n⌉ highest scores, (n,) -> (K,) long, sorted ascending (batch order).

    The paper's rule (the released code samples from a softmax of near-equal scores instead). Ties break
    towards the lower index (a stable sort), so the result is deterministic.
    """
    k = num_selected(scores.shape[0], ratio=ratio)
    order = torch.sort(scores.detach(), descending=True, stable=True).indices
    return order[:k].sort().values


# ---------------------------------------------------------------- networks


class Encoder(nn.Module):
    """Context (N, L, D) -> x̄ (N, d): per-layer Linear(D→d)+ReLU, one TransformerEncoderLayer over the L
    layer-tokens, mean-pool, L2-normalise. Trained from scratch (the paper uses a pretrained MiniLM)."""

    def __init__(self, num_layers: int, hidden_size: int, *, d: int = 64, num_heads: int = 4, dropout: float = 0.1):
        super().__init__()
        if d % num_heads:
            raise ValueError(f"d={d} must be divisible by num_heads={num_heads}")
        self.hidden_size = hidden_size
        self.project = nn.ModuleList(nn.Sequential(nn.Linear(hidden_size, d), nn.ReLU()) for _ in range(num_layers))
        self.mixer = nn.TransformerEncoderLayer(d, num_heads, dim_feedforward=4 * d, dropout=dropout, batch_first=True)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        if context.shape[1:] != (len(self.project), self.hidden_size):
            raise ValueError(f"expected contexts (N, {len(self.project)}, {self.hidden_size}), got {context.shape}")
        tokens = torch.stack([project(context[:, i]) for i, project in enumerate(self.project)], dim=1)
        return F.normalize(self.mixer(tokens).mean(dim=1), dim=-1)


class ResidualMLP(nn.Module):
    """(N, in) -> (score (N,), hidden (N, depth·width)): Linear(in→width), then `depth` pre-norm residual
    blocks h ← h + Dropout(ReLU(Linear(LayerNorm(h)))), then LayerNorm and Linear(width→1).
    `hidden` concatenates the residual stream after each block: f_S's "hidden activations"."""

    def __init__(self, in_features: int, *, width: int = 256, depth: int = 4, dropout: float = 0.1):
        super().__init__()
        self.input = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout))
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.input(x)
        hidden = []
        for block in self.blocks:
            h = h + block(h)
            hidden.append(h)
        return self.head(h).squeeze(-1), torch.cat(hidden, dim=-1)


def pool_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """Block-mean-pool by 4 along the features: (N, F) -> (N, F/4); F must be divisible by 4."""
    if hidden.shape[-1] % POOL_WIDTH:
        raise ValueError(f"feature size {hidden.shape[-1]} is not divisible by {POOL_WIDTH}")
    return hidden.unflatten(-1, (-1, POOL_WIDTH)).mean(dim=-1)


# ---------------------------------------------------------------- the scheduler


class SamsSelection(NamedTuple):
    indices: torch.Tensor  # (K,) long, ascending: the pairs that get a backward pass this step
    scores: torch.Tensor  # (n,) f_S(x̄) + λ·f_S′(h), computed during warm-up too (for logging)
    fit_loss: float  # the scheduler's MSE at its last update this round; NaN when it did not update
    warmup: bool  # True when the selection was uniformly random


@contextlib.contextmanager
def _private_cpu_rng(seed: int):
    """Seed the CPU default generator for a block and restore the caller's state after: the networks' init
    and dropout depend only on the scheduler's seed and never shift the trainer's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


class SamsScheduler:
    """The SamS bandit: call `schedule(...)` once per optimizer step with the whole batch's quantities.

    One call is one round t: (1) unless t is the first, build the rewards of round t−1 from the record
    stored then and this batch's mean loss (r_B), train f_S on MSE(f_S(x̄), r) and f_S′ on
    MSE(f_S′(h), r − f̂_S) for `updates_per_round` Adam steps on that batch plus up to `pool_batches`
    replayed ones, and add it to the pool; (2) score this batch, f_S(x̄) + λ·f_S′(h), and pick the top K
    (uniformly at random, seeded, during the first `warmup_steps` rounds); (3) record this round's
    contexts, f̂_S, h, margins, chosen log-probs and mean loss for the next call.
    `num_layers`/`hidden_size` are the policy's L and D. `state_dict()` holds everything (networks, Adam,
    pool, record, round, RNG): load it into a scheduler built with the same sizes and it continues exactly.
    Memory: the pool keeps each batch's contexts, about pool_size·n·L·D·4 bytes (500·32·4·64·4 ≈ 16 MB for a
    tiny 4-layer, 64-wide policy; a 7B-scale policy needs a much smaller pool).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        d: int = 64,
        num_heads: int = 4,
        width: int = 256,
        depth: int = 4,
        dropout: float = 0.1,
        lr: float = 1e-3,
        ratio: float = 0.5,
        explore_weight: float = 0.1,
        gamma: float = 0.5,
        delta: float = 0.5,
        pool_size: int = 500,
        pool_batches: int = 8,
        warmup_steps: int = 0,
        updates_per_round: int = 2,
        seed: int = 0,
    ):
        _require(width > 0 and width % POOL_WIDTH == 0, f"width must be a positive multiple of 4, got {width}")
        _require(depth >= 1 and updates_per_round >= 1, "depth and updates_per_round must be >= 1")
        _require(lr > 0 and explore_weight >= 0, f"need lr > 0 and explore_weight >= 0, got {lr}, {explore_weight}")
        _require(0 < ratio <= 1, f"ratio must be in (0, 1], got {ratio}")
        _require(0 <= gamma <= 1 and 0 <= delta <= 1, f"gamma and delta must be in [0, 1], got {gamma}, {delta}")
        _require(min(pool_size, pool_batches, warmup_steps) >= 0, "pool_size, pool_batches, warmup_steps must be >= 0")
        self.ratio, self.explore_weight, self.gamma, self.delta = ratio, explore_weight, gamma, delta
        self.pool_size, self.pool_batches = pool_size, pool_batches
        self.warmup_steps, self.updates_per_round = warmup_steps, updates_per_round
        self._sizes = {
            "num_layers": num_layers,
            "hidden_size": hidden_size,
            "d": d,
            "num_heads": num_heads,
            "width": width,
            "depth": depth,
        }
        with _private_cpu_rng(seed):
            self.encoder = Encoder(num_layers, hidden_size, d=d, num_heads=num_heads, dropout=dropout)
            self.f_s = ResidualMLP(d, width=width, depth=depth, dropout=dropout)
            self.f_s_prime = ResidualMLP(depth * width // POOL_WIDTH, width=width, depth=depth, dropout=dropout)
        self.networks = nn.ModuleDict({"encoder": self.encoder, "f_s": self.f_s, "f_s_prime": self.f_s_prime})
        self.networks.eval()
        self.optimizer = torch.optim.Adam(self.networks.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.round = 0
        self.pool: list[dict[str, torch.Tensor]] = []  # entries are never modified in place once stored
        self.record: dict | None = None

    def schedule(
        self,
        context: torch.Tensor,
        *,
        mean_loss: float | torch.Tensor,
        margins: torch.Tensor,
        chosen_logps: torch.Tensor,
    ) -> SamsSelection:
        """One round on a batch of n pairs under the current policy θ_{t−1}; returns the K pairs to train on.

        `context` (n, L, D) from `context_features`; `mean_loss` the mean per-pair loss over all n pairs;
        `margins` (n,) the DPO logits u; `chosen_logps` (n,) summed log-probs of the chosen answers.
        Everything is detached and copied to the CPU. Call it with the batch gathered in global order.
        """
        context = context.detach().to("cpu", torch.float32)
        n = context.shape[0]
        margins = margins.detach().to("cpu", torch.float32).reshape(-1)
        chosen_logps = chosen_logps.detach().to("cpu", torch.float32).reshape(-1)
        if margins.shape[0] != n or chosen_logps.shape[0] != n:
            raise ValueError(f"got {n} contexts, {margins.shape[0]} margins and {chosen_logps.shape[0]} log-probs")
        mean_loss = float(mean_loss)
        fit_loss = math.nan if self.record is None else self._learn(mean_loss)
        prediction, hidden, scores = self._score(context)
        warmup = self.round < self.warmup_steps
        if warmup:
            order = torch.randperm(n, generator=self.generator)
            indices = order[: num_selected(n, ratio=self.ratio)].sort().values
        else:
            indices = select_top_k(scores, ratio=self.ratio)
        self.record = {
            "context": context,
            "prediction": prediction,
            "hidden": hidden,
            "margins": margins,
            "chosen_logps": chosen_logps,
            "mean_loss": mean_loss,
        }
        self.round += 1
        return SamsSelection(indices, scores, fit_loss, warmup)

    @torch.no_grad()
    def predict(self, context: torch.Tensor) -> torch.Tensor:
        """f_S(Encoder(context)) in eval mode, (n, L, D) -> (n,): the exploitation score alone."""
        return self.f_s(self.encoder(context.detach().to("cpu", torch.float32)))[0]

    @torch.no_grad()
    def _score(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prediction, activations = self.f_s(self.encoder(context))
        hidden = pool_hidden(activations)
        explore, _ = self.f_s_prime(hidden)
        return prediction, hidden, prediction + self.explore_weight * explore

    def _learn(self, mean_loss: float) -> float:
        """Close round t−1: its reward uses the quantities stored then and this batch's mean loss."""
        record = self.record
        reward = combined_reward(
            batch_reward(record["mean_loss"], mean_loss),
            sample_rewards(record["margins"], record["chosen_logps"], delta=self.delta),
            gamma=self.gamma,
        )
        entry = {
            "context": record["context"],
            "hidden": record["hidden"],
            "reward": reward,
            "residual": reward - record["prediction"],
        }
        replayed = self._draw_replay()
        batch = {key: torch.cat([entry[key]] + [old[key] for old in replayed]) for key in entry}
        fit_loss = self._fit(batch)
        self.pool.append(entry)
        del self.pool[: max(0, len(self.pool) - self.pool_size)]
        return fit_loss

    def _draw_replay(self) -> list[dict[str, torch.Tensor]]:
        if not self.pool or not self.pool_batches:
            return []
        order = torch.randperm(len(self.pool), generator=self.generator)[: self.pool_batches]
        return [self.pool[i] for i in order.tolist()]

    def _fit(self, batch: dict[str, torch.Tensor]) -> float:
        # f̂_S and h were stored detached, so the two MSE terms train disjoint parameters: one Adam suffices.
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        self.networks.train()
        with _private_cpu_rng(dropout_seed), torch.enable_grad():
            for _ in range(self.updates_per_round):
                prediction, _ = self.f_s(self.encoder(batch["context"]))
                explore, _ = self.f_s_prime(batch["hidden"])
                loss = F.mse_loss(prediction, batch["reward"]) + F.mse_loss(explore, batch["residual"])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.networks.eval()
        return loss.item()

    def state_dict(self) -> dict:
        """A snapshot: tensors that change in place (parameters, Adam moments) are copied. Loads with
        `torch.load(..., weights_only=True)`."""
        return {
            "sizes": dict(self._sizes),
            "round": self.round,
            "networks": {key: value.clone() for key, value in self.networks.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "generator": self.generator.get_state(),
            "pool": [dict(entry) for entry in self.pool],
            "record": None if self.record is None else dict(self.record),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["sizes"] != self._sizes:
            raise ValueError(f"scheduler sizes {self._sizes} cannot load a state built with {state['sizes']}")
        self.networks.load_state_dict(state["networks"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.round = int(state["round"])
        pool = [dict(entry) for entry in state["pool"]]
        self.pool = pool[max(0, len(pool) - self.pool_size) :]
        self.record = None if state["record"] is None else dict(state["record"])
        self.networks.eval()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
