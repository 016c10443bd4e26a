"""WSM (Warmup-Stable-Merge) and power-function EMA weightings, against float64 computations written here from the
papers' formulas (arXiv 2507.17634 and Megatron-LM's weighted_merge.py for WSM; EDM2, arXiv 2312.02696)."""

from __future__ import annotations

import json
import math
from decimal import Decimal, localcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_state, read_output, save_layout

import ckptavg
from ckptavg.card import CARD_FILE
from ckptavg.errors import UsageError
from ckptavg.merge.weights import ema_sigma_rel, gamma_of, sigma_rel_of, wsm

CURVES = {
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + np.cos(np.pi * x)),
    "minus-sqrt": lambda x: 1.0 - np.sqrt(x),
}


def wsm_reference(n: int, curve: str) -> list[float]:
    """The merge coefficients of a decay curve as Megatron's tool defines them: d_k = g(k/n) for k < n; the newest
    keeps d_(n-1), each middle one the drop d_k - d_(k+1), the oldest what is left of 1."""
    name, _, modifier = curve.partition("__")
    d = CURVES[name](np.arange(n, dtype=np.float64) / n)
    c = np.zeros(n, dtype=np.float64)
    if n == 1:
        c[0] = 1.0
    else:
        c[n - 1] = d[n - 1]
        c[1 : n - 1] = d[1 : n - 1] - d[2:n]
        c[0] = 1.0 - c[1:].sum()
    return list(c[::-1] if modifier == "reverse" else c)


def sigma_rel_reference(gamma: float) -> float:
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_from_cubic(sigma_rel: float) -> float:
    """gamma from sigma_rel in closed form: sigma_rel^2 (gamma+2)^2 (gamma+3) = gamma+1 is a cubic in gamma; its
    largest real root is the gamma > 0."""
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_reference(steps: list[int], sigma_rel: float) -> list[float]:
    """w_i = (t_i^(g+1) - t_(i-1)^(g+1)) / t_N^(g+1), t_0 = 0, in 50-digit decimals (t^(g+1) is far beyond a float's
    range for narrow widths: 4000^98)."""
    exponent = Decimal(gamma_from_cubic(sigma_rel)) + 1
    with localcontext() as context:
        context.prec = 50
        cumulative = [Decimal(0)] + [Decimal(t) ** exponent for t in steps]
        return [float((b - a) / cumulative[-1]) for a, b in zip(cumulative, cumulative[1:])]


@pytest.mark.parametrize("curve", ["linear", "cosine", "minus-sqrt", "linear__reverse", "cosine__reverse", "minus-sqrt__reverse"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 32])
def test_wsm_weights_match_the_reference(curve, n):
    got = wsm(n, curve)
    assert got.strategy == f"wsm:{curve}"
    assert got.normalized == pytest.approx(wsm_reference(n, curve), rel=1e-12, abs=1e-15)
    assert math.fsum(got.normalized) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 7, 10])
def test_wsm_linear_is_the_uniform_mean_and_minus_sqrt_favours_the_oldest(n):
    assert wsm(n, "linear").normalized == pytest.approx([1 / n] * n, rel=1e-12)
    weights = wsm(n, "minus-sqrt").normalized
    # the weights telescope: the oldest keeps 1 - g(1/n) = sqrt(1/n), the most of any
    assert weights[0] == pytest.approx(math.sqrt(1 / n), rel=1e-12)
    assert weights[0] == max(weights) and all(w > 0 for w in weights)
    assert wsm(n, "minus-sqrt__reverse").normalized == weights[::-1]


@pytest.mark.parametrize("sigma_rel", [1e-4, 0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.28, 0.2886])
def test_gamma_round_trip_and_closed_form(sigma_rel):
    gamma = gamma_of(sigma_rel)
    assert gamma > 0
    assert sigma_rel_of(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert sigma_rel_reference(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    assert gamma == pytest.approx(gamma_from_cubic(sigma_rel), rel=1e-7)


def test_gamma_values_quoted_by_edm2():
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_of(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize(
    "steps", [[2, 4, 6, 8, 10], [100, 250, 1000, 1001, 4000], [7], [0, 500, 1000], [9000, 9500, 10000], [500, 500, 1000]]
)
@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.28])
def test_power_ema_weights_match_the_reference(steps, sigma_rel):
    got = ema_sigma_rel(steps, sigma_rel)
    assert got.strategy == f"ema-sigma-rel:{sigma_rel:g}"
    assert got.normalized == pytest.approx(power_ema_reference(steps, sigma_rel), rel=1e-9, abs=1e-300)


def test_power_ema_narrow_widths_favour_the_newest():
    steps = [1000 * i for i in range(1, 11)]
    narrow, wide = ema_sigma_rel(steps, 0.02).normalized, ema_sigma_rel(steps, 0.25).normalized
    assert narrow[-1] > wide[-1] and narrow[0] < wide[0]
    assert narrow == sorted(narrow) and wide == sorted(wide)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 0.2887, 0.3, 1, float("nan"), float("inf"), True, "0.1"])
def test_sigma_rel_out_of_range_is_refused_with_the_range(value):
    with pytest.raises(UsageError, match=r"ema_sigma_rel=.*\(0, 0\.2887\)"):
        gamma_of(value)


def test_power_ema_refuses_steps_out_of_order_or_all_zero():
    with pytest.raises(UsageError, match="training order"):
        ema_sigma_rel([200, 100], 0.1)
    with pytest.raises(UsageError, match="above 0"):
        ema_sigma_rel([0], 0.1)


@pytest.mark.parametrize("spec", ["wsm:", "wsm:sqrt", "wsm:linear__scramble", "wsm:Linear", "wsm:linear__reverse__reverse"])
def test_unknown_wsm_curve_is_refused(spec, tmp_path):
    path = save_layout(make_state(0), tmp_path / "in0", "hf-trainer", step=1)
    with pytest.raises(UsageError, match=r"unknown WSM curve; expected wsm:linear, wsm:cosine, wsm:minus-sqrt"):
        ckptavg.average([path], tmp_path / "out", weights=spec, dry_run=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weights": "wsm:linear", "ema_sigma_rel": 0.1},
        {"ema": 0.9, "ema_sigma_rel": 0.1},
        {"ema_half_life": 100, "ema_sigma_rel": 0.1},
    ],
)
def test_sigma_rel_is_an_alternative_to_the_other_weightings(kwargs, tmp_path):
    path = save_layout(make_state(0), tmp_path / "in0", "hf-trainer", step=1)
    with pytest.raises(UsageError, match="are alternatives; give one"):
        ckptavg.average([path], tmp_path / "out", dry_run=True, **kwargs)


def _trainer_inputs(hf_run: Path) -> tuple[list[Path], list[int], list[dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    folders = sorted(hf_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    steps = [int(p.name.split("-")[1]) for p in folders]
    return folders, steps, [load_file(p / "model.safetensors") for p in folders]


def _float64_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = math.fsum(weights)
    return {
        name: (sum(w * s[name].double() for w, s in zip(weights, states)) / total).to(first.dtype)
        for name, first in states[0].items()
        if first.is_floating_point()
    }


@pytest.mark.parametrize(
    ("options", "strategy"),
    [
        ({"weights": "wsm:minus-sqrt"}, "wsm:minus-sqrt"),
        ({"weights": "wsm:cosine__reverse"}, "wsm:cosine__reverse"),
        ({"ema_sigma_rel": 0.1}, "ema-sigma-rel:0.1"),
    ],
)
def test_average_of_a_trainer_run_is_the_float64_weighted_mean_rounded_once(hf_run, tmp_path, options, strategy):
    folders, steps, states = _trainer_inputs(hf_run)
    n = len(folders)
    if "weights" in options:
        want = wsm_reference(n, options["weights"].removeprefix("wsm:"))
    else:
        want = power_ema_reference(steps, options["ema_sigma_rel"])
    out = tmp_path / "merged"
    # given newest first: ordered by step all the same
    report = ckptavg.average(folders[::-1], out, **options)
    assert report.strategy == strategy and [i.step for i in report.inputs] == steps
    assert [i.weight for i in report.inputs] == pytest.approx(want, rel=1e-9)
    merged = read_output(out)
    reference = _float64_mean(states, want)
    for name, value in reference.items():
        assert merged[name].dtype == value.dtype
        assert torch.equal(merged[name], value), f"{name}: differs from the float64 weighted mean rounded once"
    recipe = json.loads((out / "ckptavg.json").read_text())
    assert recipe["strategy"] == strategy
    assert [i["weight"] for i in recipe["inputs"]] == pytest.approx(want, rel=1e-9)
    assert f"Strategy: {strategy}" in (out / CARD_FILE).read_text()


def test_cli_shows_the_weights_in_the_summary_dry_run_and_json(cli, hf_run, tmp_path):
    folders, steps, _ = _trainer_inputs(hf_run)
    want = power_ema_reference(steps, 0.05)
    result = cli("average", *folders, "--ema-sigma-rel", "0.05", "--dry-run", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["strategy"] == "ema-sigma-rel:0.05" and report["dry_run"]
    assert [i["weight"] for i in report["inputs"]] == pytest.approx(want, rel=1e-9)
    result = cli("average", *folders, "--weights", "wsm:minus-sqrt", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert "wsm:minus-sqrt of 5 checkpoints" in result.out
    rows = [line for line in result.out.splitlines() if "checkpoint-" in line]
    for row, step, weight in zip(rows, steps, wsm_reference(5, "minus-sqrt")):
        assert f"checkpoint-{step} " in row and row.rstrip().endswith(f"{weight:.4f}"), row
    result = cli("average", *folders, "--weights", "wsm:minus-sqrt", "--dry-run")
    assert result.code == 0 and "wsm:minus-sqrt of 5 checkpoints" in result.out
    assert f"{wsm_reference(5, 'minus-sqrt')[0]:.4f}" in result.out


def _one_error_line(result) -> str:
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


def test_cli_errors_are_one_line_with_exit_2(cli, hf_run, tmp_path):
    folders = sorted(hf_run.glob("checkpoint-*"))
    out = tmp_path / "out"
    line = _one_error_line(cli("average", *folders, "-o", out, "--weights", "wsm:sqrt"))
    assert "unknown WSM curve" in line and "wsm:minus-sqrt" in line
    for value in ("0.3", "0", "-1"):
        line = _one_error_line(cli("average", *folders, "-o", out, "--ema-sigma-rel", value))
        assert "(0, 0.2887)" in line and "sigma" in line
    line = _one_error_line(cli("average", *folders, "-o", out, "--ema-sigma-rel", "0.1", "--weights", "linear"))
    assert "alternatives" in line
    unnumbered = [save_layout(make_state(i), tmp_path / f"in{i}", "safetensors-folder") for i in range(2)]
    line = _one_error_line(cli("average", *unnumbered, "-o", out, "--ema-sigma-rel", "0.1"))
    assert "needs the training step of every input" in line and str(unnumbered[0]) in line
    assert not out.exists()


def test_wsm_needs_the_training_order(cli, tmp_path):
    unnumbered = [save_layout(make_state(i), tmp_path / f"in{i}", "safetensors-folder") for i in range(3)]
    line = _one_error_line(cli("average", *unnumbered, "-o", tmp_path / "out", "--weights", "wsm:minus-sqrt"))
    assert "cannot tell the training order" in line
    result = cli("average", *unnumbered, "-o", tmp_path / "out", "--weights", "wsm:minus-sqrt", "--order", "given", "--json")
    assert result.code == 0, result.err
    weights = [i["weight"] for i in json.loads(result.out)["inputs"]]
    assert weights == pytest.approx(wsm_reference(3, "minus-sqrt"), rel=1e-12)
