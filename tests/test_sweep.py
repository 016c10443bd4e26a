"""`ckptavg sweep`: many averages from one read. Each candidate's weight files must be byte for byte those
`ckptavg.average` writes for the same inputs and weighting; values are checked against float64 references
computed here; the inputs are read once whatever the number of candidates."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout

import ckptavg
from ckptavg.errors import OutputError, UsageError
from ckptavg.formats.writer import SafetensorsWriter
from ckptavg.merge.engine import OUTPUT_SLOTS, Engine
from ckptavg.merge.plan import build_plan
from ckptavg.merge.weights import uniform
from ckptavg.recipes import parse_recipes

STEPS = [100, 200, 400, 500]


def _state(seed: int) -> dict[str, torch.Tensor]:
    """A small bf16 model with one tensor of several chunks under a small budget, a tied head and integers."""
    state = make_state(seed, torch.bfloat16, tied=True)
    g = torch.Generator().manual_seed(seed)
    state["big.weight"] = (torch.randn(300, 400, generator=g) * (1 + seed)).to(torch.bfloat16)
    return state


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Four Trainer-style checkpoint-N folders (config and tokenizer files beside the weights), steps unevenly spaced."""
    root = tmp_path_factory.mktemp("sweep_run")
    states = [_state(seed) for seed in range(len(STEPS))]
    paths = [save_layout(state, root, "hf-trainer", step) for state, step in zip(states, STEPS)]
    return paths, states


# (candidate, recipe, the inputs average gets (indices), average's keywords, float64 reference weights)
CANDIDATES = [
    ("mean", "mean", [0, 1, 2, 3], {}, [1, 1, 1, 1]),
    ("last-2", "last:2", [2, 3], {}, [1, 1]),
    ("last-3", "last:3", [1, 2, 3], {}, [1, 1, 1]),
    ("linear", "linear", [0, 1, 2, 3], {"weights": "linear"}, [1, 2, 3, 4]),
    ("weights-1-0-2-1", "weights:1,0,2,1", [0, 1, 2, 3], {"weights": [1, 0, 2, 1]}, [1, 0, 2, 1]),
    ("ema-0.5", "ema:0.5", [0, 1, 2, 3], {"ema": 0.5}, [0.125, 0.125, 0.25, 0.5]),
    ("ema-half-life-100", "ema-half-life:100", [0, 1, 2, 3], {"ema_half_life": 100}, None),
    ("wsm-minus-sqrt", "wsm:minus-sqrt", [0, 1, 2, 3], {"weights": "wsm:minus-sqrt"}, None),
    ("wsm-cosine__reverse", "wsm:cosine__reverse", [0, 1, 2, 3], {"weights": "wsm:cosine__reverse"}, None),
    ("ema-sigma-rel-0.05", "ema-sigma-rel:0.05", [0, 1, 2, 3], {"ema_sigma_rel": 0.05}, None),
]
RECIPES = [
    "mean",
    "last:2,3",
    "linear",
    "weights:1,0,2,1",
    "ema:0.5",
    "ema-half-life:100",
    "wsm:minus-sqrt,cosine__reverse",
    "ema-sigma-rel:0.05",
]


def _half_life_weights(steps: list[int], half_life: float) -> list[float]:
    """e_1 = x_1, e_i = a_i e_(i-1) + (1 - a_i) x_i, a_i = 0.5^((s_i - s_(i-1)) / H), unrolled by hand."""
    weights = [1.0]
    for before, now in zip(steps, steps[1:]):
        a = 0.5 ** ((now - before) / half_life)
        weights = [w * a for w in weights] + [1 - a]
    return weights


def _wsm_weights(n: int, g) -> list[float]:
    """WSM (arXiv 2507.17634, as Megatron-LM's weighted_merge.py): d_k = g(k/n), c_(n-1) = d_(n-1),
    c_k = d_k - d_(k+1), c_0 = 1 - the sum of the others."""
    d = [g(k / n) for k in range(n)]
    c = [d[k] - d[k + 1] for k in range(n - 1)] + [d[n - 1]]
    c[0] = 1 - sum(c[1:])
    return c


def _sigma_rel_weights(steps: list[int], sigma_rel: float) -> list[float]:
    """EDM2's power-function EMA: gamma from sigma_rel = sqrt(g+1) / ((g+2) sqrt(g+3)) by bisection, then each
    checkpoint weighted by the profile t^gamma integrated over the steps since the one before (t_0 = 0)."""
    lo, hi = 1e-9, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if math.sqrt(mid + 1) / ((mid + 2) * math.sqrt(mid + 3)) > sigma_rel:
            lo = mid
        else:
            hi = mid
    gamma = (lo + hi) / 2
    edges = [0, *steps]
    return [(b ** (gamma + 1) - a ** (gamma + 1)) / steps[-1] ** (gamma + 1) for a, b in zip(edges, edges[1:])]


REFERENCE_WEIGHTS = {
    "ema-half-life-100": lambda: _half_life_weights(STEPS, 100),
    "wsm-minus-sqrt": lambda: _wsm_weights(4, lambda x: 1 - math.sqrt(x)),
    "wsm-cosine__reverse": lambda: _wsm_weights(4, lambda x: (1 + math.cos(math.pi * x)) / 2)[::-1],
    "ema-sigma-rel-0.05": lambda: _sigma_rel_weights(STEPS, 0.05),
}


@pytest.fixture(scope="module")
def swept(run, tmp_path_factory):
    paths, _ = run
    out = tmp_path_factory.mktemp("swept") / "sweep"
    # A small budget: the big tensor is cut into many chunks, each folded into the seven outputs
    report = ckptavg.sweep([str(p) for p in reversed(paths)], out, recipes=RECIPES, memory_budget="2MiB")
    return out, report


@pytest.mark.parametrize(("name", "recipe", "chosen", "keywords", "_"), CANDIDATES, ids=[c[0] for c in CANDIDATES])
def test_each_candidate_is_what_average_writes(run, swept, tmp_path, name, recipe, chosen, keywords, _):
    paths, _states = run
    out, report = swept
    alone = tmp_path / "alone"
    averaged = ckptavg.average([str(paths[i]) for i in chosen], alone, **keywords)
    weight_files = [f for f in averaged.output_files if f.endswith(".safetensors")]
    assert weight_files == ["model.safetensors"]
    assert (out / name / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()
    assert (out / name / "config.json").read_bytes() == (alone / "config.json").read_bytes()
    candidate = next(c for c in report.candidates if c.name == name)
    assert candidate.recipe == recipe
    assert candidate.inputs == [i.path for i in averaged.inputs]
    assert candidate.weights == [i.weight for i in averaged.inputs]
    recorded = json.loads((out / name / "ckptavg.json").read_text())
    assert recorded["sweep"] == {"candidate": name, "recipe": recipe}
    assert [i["weight"] for i in recorded["inputs"]] == candidate.weights


@pytest.mark.parametrize(
    "name",
    ["last-2", "ema-0.5", "ema-half-life-100", "weights-1-0-2-1", "wsm-minus-sqrt", "wsm-cosine__reverse", "ema-sigma-rel-0.05"],
)
def test_values_match_a_float64_reference(run, swept, name):
    _paths, states = run
    out, report = swept
    _, _, chosen, _, weights = next(c for c in CANDIDATES if c[0] == name)
    weights = weights or REFERENCE_WEIGHTS[name]()
    candidate = next(c for c in report.candidates if c.name == name)
    assert candidate.weights == pytest.approx([w / sum(weights) for w in weights], rel=1e-9, abs=1e-12)
    want = reference_average([states[i] for i in chosen], weights)
    got = read_output(out / name)
    for tensor, value in want.items():
        if tensor == "head.weight":
            continue  # tied: written once under embed.weight's bytes
        if value.is_floating_point():
            # the reference rounds the float64 mean once; the FP32 accumulator may differ from it by one bf16 ulp
            assert torch.allclose(got[tensor].double(), value.double(), rtol=2**-7, atol=1e-6), tensor
        else:
            assert torch.equal(got[tensor], value), tensor


def test_inputs_are_read_once_and_dir_holds_whole_candidates(run, swept, tmp_path):
    paths, _ = run
    out, report = swept
    one = ckptavg.average([str(p) for p in paths], tmp_path / "mean")
    assert report.passes == 1
    assert report.bytes_read == one.bytes_read == report.bytes_to_read
    record = json.loads((out / "sweep.json").read_text())
    assert [c["name"] for c in record["candidates"]] == [c[0] for c in CANDIDATES]
    assert sorted(p.name for p in out.iterdir()) == sorted([c[0] for c in CANDIDATES] + ["sweep.json"])
    assert record["candidates"][1]["inputs"] == [str(paths[2]), str(paths[3])]
    assert math.isclose(sum(record["candidates"][5]["weights"]), 1.0)
    assert not list(out.parent.glob(".sweep.ckptavg-*"))


def test_newest_candidates_read_only_their_inputs(run, tmp_path):
    paths, _ = run
    report = ckptavg.sweep(paths, tmp_path / "s", recipes=["last:2,3"])
    alone = ckptavg.average(paths[1:], tmp_path / "a")
    assert report.bytes_read == alone.bytes_read < sum(p.stat().st_size for p in [pp / "model.safetensors" for pp in paths])


def test_pt_candidates_are_what_average_writes(run, tmp_path):
    paths, _ = run
    ckptavg.sweep(paths, tmp_path / "s", recipes=["last:2", "ema:0.5"], out_format="pt")
    ckptavg.average(paths[2:], tmp_path / "a", out_format="pt")
    ckptavg.average(paths, tmp_path / "e", ema=0.5, out_format="pt")
    assert (tmp_path / "s" / "last-2" / "pytorch_model.bin").read_bytes() == (tmp_path / "a" / "pytorch_model.bin").read_bytes()
    assert (tmp_path / "s" / "ema-0.5" / "pytorch_model.bin").read_bytes() == (tmp_path / "e" / "pytorch_model.bin").read_bytes()


def test_cli_json_report_and_summary(cli, run, tmp_path):
    paths, _ = run
    result = cli("sweep", *paths, "-o", tmp_path / "s", "--recipe", "mean", "--recipe", "last:2", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [c["name"] for c in data["candidates"]] == ["mean", "last-2"]
    assert data["candidates"][1]["weights"] == [0.5, 0.5]
    assert data["candidates"][1]["output"] == str(tmp_path / "s" / "last-2")
    assert data["bytes_read"] == data["bytes_to_read"] > 0
    result = cli("sweep", *paths, "-o", tmp_path / "t", "--recipe", "ema:0.5,0.9")
    assert result.code == 0, result.err
    assert "ema-0.5" in result.out and "ema-0.9" in result.out and "in one read" in result.out


@pytest.mark.parametrize(
    ("recipe", "said"),
    [
        ("foo", "unknown recipe 'foo'"),
        ("last:0", "is not a number of checkpoints"),
        ("last", "last needs a value"),
        ("ema:1.5", "a decay must lie in [0, 1)"),
        ("ema-half-life:-3", "expected a number > 0"),
        ("weights:1,x", "'x' is not a number"),
        ("mean:2", "mean takes no value"),
        ("last:9", "last 9 of 4 inputs"),
        ("weights:1,2", "2 weights for 4 checkpoints"),
        ("wsm:steep", "unknown WSM curve 'steep'"),
        ("ema-sigma-rel:0.3", "a relative width must lie in (0, 0.2887)"),
    ],
)
def test_bad_recipes_are_one_line_exit_2(cli, run, tmp_path, recipe, said):
    paths, _ = run
    result = cli("sweep", *paths, "-o", tmp_path / "s", "--recipe", recipe)
    assert result.code == 2
    assert said in result.err
    assert f"--recipe {recipe}" in result.err
    assert result.err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_step_weightings_need_every_step(cli, tmp_path):
    paths = [save_layout(make_state(seed), tmp_path / f"in{seed}", "safetensors") for seed in range(3)]
    result = cli("sweep", *paths, "-o", tmp_path / "s", "--recipe", "ema-sigma-rel:0.1", "--order", "given")
    assert result.code == 2
    assert "--recipe ema-sigma-rel:0.1: ema-sigma-rel needs the training step of every input; 3 of 3 have none" in result.err


def test_recipe_lists_and_repeats():
    assert [r.name for r in parse_recipes(["last:2,4", "ema:0.9,0.99", "wsm:minus-sqrt"])] == [
        "last-2",
        "last-4",
        "ema-0.9",
        "ema-0.99",
        "wsm-minus-sqrt",
    ]
    with pytest.raises(UsageError, match="candidate last-2 is already asked for by last:2"):
        parse_recipes(["last:2", "last:2,3"])
    with pytest.raises(UsageError, match="give at least one recipe"):
        parse_recipes([])
    with pytest.raises(UsageError, match=r"^recipes='ema:2': a decay must lie in \[0, 1\), not 2$"):
        parse_recipes(["ema:2"])  # from Python, the option is named by its keyword


def test_existing_dir_is_refused_unless_overwrite_and_written_by_ckptavg(cli, run, tmp_path):
    paths, _ = run
    out = tmp_path / "s"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("sweep", *paths, "-o", out, "--recipe", "mean")
    assert result.code == 3 and "already exists; pass --overwrite" in result.err
    result = cli("sweep", *paths, "-o", out, "--recipe", "mean", "--overwrite")
    assert result.code == 3 and "not a ckptavg output" in result.err
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "t"
    assert cli("sweep", *paths, "-o", other, "--recipe", "mean").code == 0
    assert cli("sweep", *paths, "-o", other, "--recipe", "last:2").code == 3
    assert cli("sweep", *paths, "-o", other, "--recipe", "last:2", "--overwrite").code == 0
    assert sorted(p.name for p in other.iterdir()) == ["last-2", "sweep.json"]


def test_a_failure_mid_run_leaves_no_candidate(run, tmp_path, monkeypatch):
    paths, _ = run
    calls = []
    write = SafetensorsWriter.write

    def failing(self, data):
        calls.append(1)
        if len(calls) == 12:
            raise OSError(28, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(SafetensorsWriter, "write", failing)
    with pytest.raises(OutputError, match="No space left on device"):
        ckptavg.sweep(paths, tmp_path / "s", recipes=["mean", "last:2", "linear"], memory_budget="2MiB")
    assert len(calls) >= 12
    assert list(tmp_path.iterdir()) == []  # no DIR, no staged leftovers, no lock


def test_dry_run_writes_nothing(run, tmp_path):
    paths, _ = run
    report = ckptavg.sweep(paths, tmp_path / "s", recipes=["mean", "last:2"], dry_run=True)
    assert report.dry_run and [c.name for c in report.candidates] == ["mean", "last-2"]
    assert report.bytes_read == 0 and report.bytes_to_read > 0
    assert not (tmp_path / "s").exists()


def test_memory_budget_is_shared_by_the_candidates(run):
    """K outputs: the output chunks in flight shrink K-fold, so buffers stay within the budget whatever K."""
    paths, _ = run
    from ckptavg.checkpoint import LoadOptions, open_checkpoint

    inputs = [open_checkpoint(p, LoadOptions()) for p in paths]
    budget = 4 << 20
    for k in (1, 4, 8):
        plans = [build_plan(inputs, uniform(len(inputs))) for _ in range(k)]
        engine = Engine(plans, torch.device("cpu"), budget, workers=2)
        width = len(inputs)
        blocks = 2 * engine.sizes.block_elements * (width * 2 + 2 * 4)
        assert OUTPUT_SLOTS * k * engine.sizes.chunk_bytes + blocks <= budget
        assert engine.read_bytes == plans[0].read_bytes  # each input once, not k times


# --- every input format average reads ------------------------------------------------------------------------


def _step_folders(root: Path, prefix: str) -> list[Path]:
    return sorted(root.glob(f"{prefix}*"), key=lambda p: int(p.name.removeprefix(prefix)))


def _weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".bin")))


@pytest.mark.parametrize(
    ("fixture", "prefix", "keywords", "passes"),
    [
        ("dcp_fsdp2_ckpts", "step-", {}, 1),
        ("deepspeed_zero3_ckpts", "global_step", {}, 1),
        ("lora_plain", "checkpoint-", {"adapter_mode": "params"}, 1),
        ("lora_plain", "checkpoint-", {"adapter_mode": "exact"}, 3),  # each candidate stacks its own factors
    ],
    ids=["dcp", "zero3", "lora-params", "lora-exact"],
)
def test_every_format_gives_what_average_writes(request, tmp_path, fixture, prefix, keywords, passes):
    paths = _step_folders(request.getfixturevalue(fixture), prefix)
    assert len(paths) >= 3
    report = ckptavg.sweep(paths, tmp_path / "s", recipes=["mean", "last:2", "ema:0.5"], **keywords)
    assert report.passes == passes
    for name, chosen, options in [("mean", paths, {}), ("last-2", paths[-2:], {}), ("ema-0.5", paths, {"ema": 0.5})]:
        alone = tmp_path / name
        ckptavg.average(chosen, alone, **options, **keywords)
        files = _weight_files(alone)
        assert files and _weight_files(tmp_path / "s" / name) == files
        for file in files:
            assert (tmp_path / "s" / name / file).read_bytes() == (alone / file).read_bytes(), (name, file)
    if passes == 1:
        assert report.bytes_read == ckptavg.average(paths, tmp_path / "one", **keywords).bytes_read


@pytest.mark.parametrize("staged", [False, True], ids=["cpu-workers", "staged"])
def test_engine_runs_k_plans_as_k_runs_would(run, tmp_path, staged):
    """The engine's two pipelines (CPU fold workers; the staged reader of the CUDA path, run on the CPU) write
    for each of K plans over overlapping inputs the bytes a run of that plan alone writes."""
    from ckptavg.checkpoint import LoadOptions, open_checkpoint
    from ckptavg.merge.plan import output_specs
    from ckptavg.merge.weights import ema, linear

    paths, _ = run
    inputs = [open_checkpoint(p, LoadOptions()) for p in paths]
    plans = [
        build_plan(inputs, uniform(4)),
        build_plan(inputs[2:], uniform(2)),
        build_plan(inputs, linear(4), accum="fp64"),
        build_plan(inputs[1:], ema(3, 0.7), torch.float32),
    ]

    def writer(plan, path: Path) -> SafetensorsWriter:
        return SafetensorsWriter([path], [output_specs(plan)], {"format": "pt"})

    together = [writer(p, tmp_path / f"k{k}.safetensors") for k, p in enumerate(plans)]
    engine = Engine(plans, torch.device("cpu"), 1 << 20, staged=staged, workers=2)
    assert len(engine.chunks()) > len(plans[0].entries)  # the big tensor is cut into chunks
    engine.run(together)
    for w in together:
        w.finish()
    for k, plan in enumerate(plans):
        alone = writer(plan, tmp_path / f"alone{k}.safetensors")
        Engine(plan, torch.device("cpu"), staged=staged).run(alone)
        alone.finish()
        assert (tmp_path / f"k{k}.safetensors").read_bytes() == (tmp_path / f"alone{k}.safetensors").read_bytes(), k
    assert engine.bytes_read == plans[0].read_bytes  # inputs[2:] and inputs[1:] are read with the mean's, once


def test_progress_shows_the_pass_and_the_candidates(run, tmp_path):
    from rich.console import Console

    from ckptavg.render import ProgressDisplay

    paths, _ = run
    display = ProgressDisplay(enabled=True, console=Console(file=io.StringIO(), force_terminal=False))
    seen = []
    report = ckptavg.sweep(
        paths,
        tmp_path / "s",
        recipes=["mean", "last:2"],
        on_plan=display.on_plan,
        on_progress=lambda p: seen.append((p.bytes_done, p.bytes_total)) or display.update(p),
    )
    assert display.verb == "sweeping"
    assert display.plan.startswith("4 inputs (steps 100..500), 2 candidates (mean, last-2), one read, ")
    assert seen[-1] == (report.bytes_read, report.bytes_to_read)
    assert display.status_text().startswith("sweeping 100%")


def test_strict_refuses_a_candidate_that_warns(cli, run, tmp_path):
    paths, _ = run
    result = cli("sweep", *paths, "-o", tmp_path / "s", "--recipe", "mean", "--recipe", "ema:0.9", "--strict")
    assert result.code == 1
    assert "warning treated as an error (--strict): ema-0.9: the EMA gives the oldest input 73% of the weight" in result.err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "dtype,spread", [(torch.bfloat16, 20), (torch.float16, 6), (torch.float32, 20), (torch.float8_e4m3fn, 3)]
)
def test_nested_windows_from_one_running_sum_are_each_window_alone(dtype, spread):
    """fold_nested makes the means of the newest 1, 2, 5 and 8 inputs from one sum; each is bit for bit the
    uniform mean of that window folded alone, and within the FP32 sum's error and one rounding of a float64
    reference."""
    from ckptavg.merge.engine import fold_block, fold_nested

    g = torch.Generator().manual_seed(3)
    # magnitudes spread over 2^-spread..2^spread, so that the order of the sum shows in the low bits
    scale = torch.exp2(torch.randint(-spread, spread, (8, 5000), generator=g).float())
    inputs = list((torch.randn(8, 5000, generator=g) * scale).to(dtype))
    windows = [1, 2, 5, 8]
    outs = [torch.empty(5000) for _ in windows]  # FP32 outputs: a bf16 rounding would hide the order of the sum
    fold_nested(inputs, windows, [float(w) for w in windows], torch.empty(5000), outs)
    for window, out in zip(windows, outs):
        alone = torch.empty(5000)
        fold_block(inputs[8 - window :], [1.0] * window, float(window), torch.empty(5000), alone)
        assert torch.equal(out.view(torch.int32), alone.view(torch.int32)), window
        terms = torch.stack([x.double() for x in inputs[8 - window :]])
        reference = terms.sum(0) / window
        bound = 2**-23 * reference.abs() + window * 2**-24 * terms.abs().sum(0)
        assert bool(((out.double() - reference).abs() <= bound).all()), window


def test_fold_groups_chain_uniform_means_of_nested_windows_only():
    from ckptavg.merge.engine import Row, fold_groups
    from ckptavg.merge.plan import PlanEntry

    def entry(accum):
        return PlanEntry(name="w", dtype=torch.bfloat16, shape=(4,), sources=[], weights=[], accum_dtype=accum)

    picks = [[0, 1, 2, 3], [2, 3], [0, 1], [1, 2, 3], [0, 1, 2, 3], [3], [2, 3]]
    weights = [[1.0] * 4, [1.0] * 2, [1.0] * 2, [0.2, 0.3, 0.5], [0.1, 0.2, 0.3, 0.4], [1.0], [1.0] * 2]
    accums = [torch.float32] * 6 + [torch.float64]
    row = Row([entry(a) for a in accums], [], picks, weights)
    # last-1 (5) < last-2 (1) < mean (0) chain; the first two (2) and the weighted ones (3, 4) alone; the FP64 last-2 (6) alone
    assert sorted(fold_groups(row)) == sorted([[5, 1, 0], [2], [6], [3], [4]])
