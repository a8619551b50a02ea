"""The loss table (`rayalign.loss_registry.LOSSES`) is the one list of losses: it matches the spec's names,
every row binds to a real function with the arguments the row promises, and adding a loss as its docstring
says (SimPO) works with no other change."""

import inspect
import re
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayalign import config as config_module
from rayalign import loss_registry, objective
from rayalign.config import LossConfig
from rayalign.core import losses as L
from rayalign.loss_registry import GROUP_LOSSES, LOSSES, PAIR_LOSSES

SPEC = Path(__file__).resolve().parents[1].parent / "shared" / "spec" / "ALGORITHMS.md"


def _spec_loss_names() -> list[str]:
    """The `loss.type` names of ALGORITHMS.md §7, in order (parenthesised remarks dropped)."""
    section = SPEC.read_text().split("## 7. Names in configs", 1)[1]
    sentence = section.split("`loss.type`:", 1)[1].split(". ", 1)[0]
    return re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", sentence))


@pytest.mark.skipif(not SPEC.is_file(), reason=f"the spec is not checked out next to the repo ({SPEC} missing)")
def test_table_is_the_spec_list_of_losses():
    names = _spec_loss_names()
    assert len(names) >= 9, names  # the parse found the list
    assert sorted(LOSSES) == sorted(names)
    for spec in LOSSES.values():  # every function the table names is one ALGORITHMS.md defines
        assert f"`{spec.function}(" in SPEC.read_text(), spec.function


def test_everything_else_derives_from_the_table():
    assert config_module.LOSS_TYPES == tuple(LOSSES) == loss_registry.LOSS_TYPES
    assert set(PAIR_LOSSES) | set(GROUP_LOSSES) == set(LOSSES) and not set(PAIR_LOSSES) & set(GROUP_LOSSES)
    assert objective.PAIR_LOSSES == PAIR_LOSSES and objective.GROUP_LOSSES == GROUP_LOSSES
    assert [n for n in LOSSES if loss_registry.uses_mean_logps(n)] == ["ipo"]
    for name in LOSSES:
        LossConfig(type=name)  # every row is a valid loss.type


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_row_binds_to_its_function_and_arguments(name):
    spec = LOSSES[name]
    function = objective.loss_function(name)
    assert function is getattr(L, spec.function)
    parameters = inspect.signature(function).parameters
    keywords = [k for k, _ in spec.options]
    keywords += ["label_smoothing"] if spec.label_smoothing is not None else []
    keywords += {"theta": ["neg_log_dispersion"], "phi": ["phi"], None: []}[spec.dispersion]
    for keyword in keywords:
        assert parameters[keyword].kind is inspect.Parameter.KEYWORD_ONLY, keyword
    for _, field in spec.options:
        assert hasattr(LossConfig(), field), field


def _pair_inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pair_loss_runs_every_pairwise_row(name):
    """`pair_loss` calls each pairwise loss with the extras its row declares, and equals a direct call."""
    config = LossConfig(type=name)
    inputs = _pair_inputs()
    k = torch.full((3,), 0.8, dtype=torch.float64)
    gdpo = {"level_logps": torch.log_softmax(torch.zeros(3, 4, dtype=torch.float64), -1),
            "target_probs": torch.full((3, 4), 0.25, dtype=torch.float64),
            "belief_mean_logps": torch.full((3,), -1.0, dtype=torch.float64)}
    out = objective.pair_loss(config, *inputs, neg_log_dispersion=k, gdpo=gdpo)
    assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
    direct = {"dpo": lambda: L.dpo_loss(*inputs, beta=0.1, label_smoothing=0.0),
              "exo_pref": lambda: L.exo_pref_loss(*inputs, beta=0.1, label_smoothing=1e-3),
              "mallows_theta": lambda: L.mallows_theta_loss(*inputs, beta=0.1, neg_log_dispersion=k),
              "mallows_phi": lambda: L.mallows_phi_loss(*inputs, beta=0.1, phi=torch.exp(-k))}
    if name in direct:
        torch.testing.assert_close(out.losses, direct[name]().losses)


@pytest.mark.parametrize("name", GROUP_LOSSES)
def test_group_loss_runs_every_group_row(name):
    g = torch.Generator().manual_seed(1)
    policy, ref, rewards = (torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    out = objective.group_loss(LossConfig(type=name, beta=0.2, beta_r=0.3), policy, ref, rewards)
    direct = getattr(L, LOSSES[name].function)(policy, ref, rewards, beta_pi=0.2, beta_r=0.3)
    torch.testing.assert_close(out.losses, direct.losses)


def _docstring_blocks() -> list[str]:
    """The code blocks (8-space indented) of `loss_registry`'s docstring, dedented."""
    blocks, current = [], []
    for line in loss_registry.__doc__.splitlines() + [""]:
        if line.startswith(" " * 7) or (current and not line.strip()):
            current.append(line)
        elif current:
            blocks.append(textwrap.dedent("\n".join(current)).strip())
            current = []
    return [b for b in blocks if b]


def test_adding_simpo_as_the_docstring_says(monkeypatch):
    """The docstring's SimPO function and row, and nothing else, make `pair_loss` run SimPO."""
    function_code, row_code = _docstring_blocks()[:2]
    namespace = dict(vars(L))
    exec(function_code, namespace)  # noqa: S102 (our own docstring)
    row = eval(row_code.rstrip(","), vars(loss_registry))  # noqa: S307
    monkeypatch.setattr(L, "simpo_loss", namespace["simpo_loss"], raising=False)
    monkeypatch.setitem(LOSSES, "simpo", row)
    config = SimpleNamespace(type="simpo", beta=2.0, label_smoothing=None)
    chosen, rejected, ref_chosen, ref_rejected = _pair_inputs()
    out = objective.pair_loss(config, chosen, rejected, ref_chosen, ref_rejected)
    expected = -torch.nn.functional.logsigmoid(2.0 * (chosen - rejected) - 0.5)
    torch.testing.assert_close(out.losses, expected)
    assert loss_registry.uses_mean_logps("simpo")
