"""The Python API: its public names, its option values as a Python caller passes them (every bad one a
UsageError naming the keyword, checked before any input is opened), select/inspect/diff returning the reports
the commands print, and models written by ckptavg read back with their step (export, then average the exports)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import make_state, read_output, reference_average, save_layout
from runs import eval_losses
from safetensors.torch import load_file

import ckptavg
from ckptavg.errors import UsageError
from ckptavg.options import AverageOptions

PUBLIC = {
    "__version__",
    "average",
    "export",
    "select",
    "inspect",
    "diff",
    "sweep",
    "SweepReport",
    "tune",
    "TuneReport",
    "AverageReport",
    "Selection",
    "InspectReport",
    "DiffReport",
    "CkptavgError",
}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three safetensors checkpoints of one run and their states."""
    root = tmp_path_factory.mktemp("three")
    states = [make_state(s) for s in range(3)]
    return [save_layout(state, root / f"in{i}", "safetensors") for i, state in enumerate(states)], states


# --- public names --------------------------------------------------------------------------------------------


def test_public_names_are_the_api_and_nothing_else():
    assert set(ckptavg.__all__) == PUBLIC
    assert set(dir(ckptavg)) == PUBLIC
    for name in PUBLIC:
        assert getattr(ckptavg, name) is not None
    leaked = [
        name
        for name, value in vars(ckptavg).items()
        if isinstance(value, types.ModuleType) and not value.__name__.startswith("ckptavg.")
    ]
    assert leaked == []
    others = {
        name for name, value in vars(ckptavg).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert others - PUBLIC <= {
        "annotations"
    }  # the __future__ import; submodules (ckptavg.errors, ...) are attributes once imported
    for function in (ckptavg.select, ckptavg.inspect, ckptavg.diff, ckptavg.average, ckptavg.export, ckptavg.tune):
        assert function.__doc__ and "Returns" in function.__doc__


def test_importing_the_api_loads_no_torch():
    code = "import sys, ckptavg; ckptavg.select, ckptavg.inspect, ckptavg.diff; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(ckptavg.__file__).parent.parent
    )
    assert out.stdout.strip() == "False"


# --- weights -------------------------------------------------------------------------------------------------


def test_weights_as_a_sequence_of_numbers(three, tmp_path):
    paths, states = three
    expected = reference_average(states, [1.0, 2.0, 0.5])
    for i, weights in enumerate(([1, 2, 0.5], (1.0, 2.0, 0.5), "1,2,0.5", iter([1, 2, 0.5]))):
        report = ckptavg.average(paths, tmp_path / f"out{i}", weights=weights, order="given")
        assert [i.weight for i in report.inputs] == pytest.approx([1 / 3.5, 2 / 3.5, 0.5 / 3.5])
        out = read_output(tmp_path / f"out{i}")
        for name, value in expected.items():
            assert torch.equal(out[name], value), name


def test_weights_for_the_wrong_number_of_checkpoints(three, tmp_path, cli):
    paths, _ = three
    with pytest.raises(UsageError, match=r"^weights=\.\.\. gives 2 weights for 3 checkpoints$"):
        ckptavg.average(paths, tmp_path / "out", weights=[1, 2], order="given")
    result = cli("average", *paths, "--weights", "1", "--order", "given", "-o", tmp_path / "out")
    assert result.code == 2 and result.err.strip() == "error: --weights gives 1 weight for 3 checkpoints"
    assert not (tmp_path / "out").exists()


# --- bad values: a UsageError naming the keyword, before anything is read ------------------------------------

BAD_AVERAGE = [
    ({"weights": [True, 1]}, r"weights=\[True, 1\]: True is not a number"),
    ({"weights": [1, -1]}, r"weights=\[1, -1\]: every weight must be a finite number >= 0, not -1"),
    ({"weights": [1, math.nan]}, r"weights=\[1, nan\]: .* not nan"),
    ({"weights": [1, math.inf]}, r"weights=\[1, inf\]: .* not inf"),
    ({"weights": "1,inf"}, r"weights='1,inf': .* not inf"),
    ({"weights": [0, 0]}, r"weights=\[0, 0\]: every weight is 0"),
    ({"weights": "one,two"}, r"weights='one,two': expected uniform, linear, wsm:CURVE or numbers like 1,2,3"),
    ({"weights": ["1", "2"]}, r"weights=\['1', '2'\]: '1' is not a number"),
    ({"weights": 3}, r"weights=3: expected uniform, linear"),
    ({"weights": []}, r"weights=\[\]: expected uniform, linear"),
    ({"weights": True}, r"weights=True: expected uniform, linear"),
    ({"weights": "linear", "ema": 0.5}, r"weights=... and ema=... are alternatives"),
    ({"ema": 1.5}, r"ema=1.5: expected a decay in \[0, 1\)"),
    ({"ema": True}, r"ema=True: expected a decay, not bool"),
    ({"ema": "0.9"}, r"ema='0.9': expected a decay, not str"),
    ({"ema": math.nan}, r"ema=nan: expected a finite number in \[0, 1\)"),
    ({"ema_half_life": 0}, r"ema_half_life=0: expected a number of steps above 0"),
    ({"ema_half_life": math.inf}, r"ema_half_life=inf: expected a finite number above 0"),
    ({"dtype": "bf8"}, r"dtype='bf8': expected one of bf16, fp16, fp32"),
    ({"dtype": ["bf16"]}, r"dtype=\['bf16'\]: expected one of"),
    ({"accum": None}, r"accum=None: expected one of auto, fp32, fp64"),
    ({"order": "newest"}, r"order='newest': expected one of auto, given"),
    ({"device": "gpu"}, r"device='gpu': expected auto, cpu, cuda or cuda:N"),
    ({"device": None}, r"device=None: expected auto, cpu"),
    ({"memory_budget": -1}, r"memory_budget=-1: expected a size above 0"),
    ({"memory_budget": True}, r"memory_budget=True: expected a size above 0"),
    ({"memory_budget": "inf"}, r"memory_budget='inf': expected a size above 0"),
    ({"max_shard_size": 1.5}, r"max_shard_size=1.5: expected a size above 0"),
    ({"max_shard_size": "big"}, r"max_shard_size='big': expected a size above 0"),
    ({"adapter_mode": "average"}, r"adapter_mode='average': expected one of exact, params, merged"),
    ({"adapter_rank": 0}, r"adapter_rank=0: expected a whole number >= 1"),
    ({"adapter_rank": 2.0}, r"adapter_rank=2.0: expected a whole number, not float"),
    ({"adapter_rank": True}, r"adapter_rank=True: expected a whole number, not bool"),
    ({"rank_timeout": "60"}, r"rank_timeout='60': expected a number of seconds, not str"),
    ({"rank_timeout": -1}, r"rank_timeout=-1: expected a number of seconds above 0"),
    ({"rank_timeout": math.nan}, r"rank_timeout=nan: expected a finite number above 0"),
    ({"out_format": "gguf"}, r"out_format='gguf': expected one of auto, safetensors, pt"),
    ({"key": 3}, r"key=3: expected a string, not int"),
    ({"strip_prefixes": [1]}, r"strip_prefixes=\[1\]: expected strings, one per prefix, not int"),
    ({"base": 3}, r"base 3: expected a path"),
]


@pytest.mark.parametrize("options, message", BAD_AVERAGE, ids=[f"{next(iter(o))}={o[next(iter(o))]!r}" for o, _ in BAD_AVERAGE])
def test_a_bad_value_is_a_usage_error_naming_the_keyword(options, message, tmp_path):
    """Missing inputs and an existing output: the bad value is still the error, so it was checked first."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("not ours")
    with pytest.raises(UsageError, match=message) as caught:
        ckptavg.average([tmp_path / "missing-a", tmp_path / "missing-b"], tmp_path / "out", **options)
    assert "--" not in str(caught.value)


def test_the_options_object_checks_every_value_and_returns_a_normalised_copy():
    given = AverageOptions(
        weights=(w for w in (1, 3)),
        dtype="torch.bfloat16",
        accum="float64",
        device=torch.device("cpu"),
        max_shard_size="2KB",
        memory_budget="1MiB",
        key="model",
        use_ema=True,
        strip_prefixes=["module."],
    )
    checked = given.check()
    assert (checked.weights, checked.dtype, checked.accum, checked.device) == ([1.0, 3.0], "bf16", "fp64", "cpu")
    assert (checked.shard_bytes, checked.budget_bytes, checked.out_dtype) == (2000, 1 << 20, torch.bfloat16)
    assert checked.load_options == ckptavg.checkpoint.LoadOptions(key="model", use_ema=True, strip_prefixes=("module.",))
    assert given.dtype == "torch.bfloat16" and checked.check() == checked  # the given object is left as it was
    with pytest.raises(UsageError, match=r"^ema=1.5: expected a decay in \[0, 1\)"):
        AverageOptions(ema=1.5).check()


def test_every_option_of_average_reaches_the_options_object_and_each_command_calls_its_function_with_its_own():
    """`average`, `sweep` and `tune` pass their options on as AverageOptions.pick(locals()), and each command its
    parameters as library_keywords(locals()): a parameter the other side does not know would be lost, or fail."""
    import dataclasses
    import inspect

    from ckptavg.cli import average as cli_average
    from ckptavg.cli import export as cli_export
    from ckptavg.cli import sweep as cli_sweep
    from ckptavg.cli import tune as cli_tune
    from ckptavg.cli.params import library_keywords

    fields = {f.name for f in dataclasses.fields(AverageOptions)}
    assert fields <= set(inspect.signature(ckptavg.average).parameters)
    options = AverageOptions.pick({**{name: None for name in fields}, "paths": [], "on_progress": print})
    assert dataclasses.asdict(options) == {name: None for name in fields}
    for function in (ckptavg.sweep, ckptavg.tune):
        taken = set(inspect.signature(function).parameters) & fields
        assert taken >= {"order", "dtype", "device", "key", "strip_prefixes", "memory_budget", "out_format", "training_state"}
    for command, function, callbacks in (
        (cli_average.average, ckptavg.average, {"on_progress", "on_plan"}),
        (cli_sweep.sweep, ckptavg.sweep, {"on_progress", "on_plan"}),
        (cli_tune.tune, ckptavg.tune, {"on_candidate", "on_progress"}),
        (cli_export.export, ckptavg.average, {"on_progress", "on_plan"}),  # export passes its keywords on to average
    ):
        keywords = library_keywords(dict.fromkeys(inspect.signature(command).parameters))
        accepted = set(inspect.signature(function).parameters) | ({"merge"} if command is cli_export.export else set())
        assert set(keywords) <= accepted - callbacks, (command.__name__, set(keywords) - accepted)
    assert library_keywords({"strip_prefix": None, "accum_dtype": "fp64", "no_fsync": True, "quiet": True}) == {
        "strip_prefixes": (),
        "accum": "fp64",
        "fsync": False,
    }


def test_a_bad_value_comes_before_the_inputs_and_the_output_on_the_command_line(tmp_path, cli):
    (tmp_path / "out").mkdir()
    result = cli("average", tmp_path / "missing-a", tmp_path / "missing-b", "--ema", "1.5", "-o", tmp_path / "out")
    assert result.code == 2 and result.err.strip() == "error: --ema 1.5: expected a decay in [0, 1)"
    result = cli("average", tmp_path / "missing-a", "--weights", "1,nan", "-o", tmp_path / "out")
    assert (
        result.code == 2 and result.err.strip() == "error: --weights '1,nan': every weight must be a finite number >= 0, not nan"
    )


def test_export_checks_its_values_first(tmp_path):
    with pytest.raises(UsageError, match=r"^dtype='float8': expected one of bf16, fp16, fp32$"):
        ckptavg.export(tmp_path / "missing", tmp_path / "out", dtype="float8")
    with pytest.raises(UsageError, match=r"^paths 3: expected a path"):
        ckptavg.export(3, tmp_path / "out")


BAD_SELECT = [
    ({"last": "3"}, r"last='3': expected a whole number, not str"),
    ({"last": 0}, r"last=... must be at least 1"),
    ({"top_k": 2.5, "metric": "eval_loss"}, r"top_k=2.5: expected a whole number"),
    ({"top_k": 2}, r"top_k=... needs metric=NAME"),
    ({"max_step": "latest"}, r"max_step='latest': expected a step or 'best'"),
    ({"max_step": "best"}, r"max_step='best' needs metric=NAME"),
    ({"after_warmup": True}, r"after_warmup=True: expected a number, not bool"),
    ({"spike_k": -1.0}, r"spike_k=-1.0: expected a number above 0"),
    ({"mode": "lowest", "metric": "eval_loss"}, r"mode='lowest': expected min or max"),
    ({"metric": 3}, r"metric=3: expected a string"),
]


@pytest.mark.parametrize("options, message", BAD_SELECT)
def test_select_checks_its_values_first(options, message, tmp_path):
    with pytest.raises(UsageError, match=message) as caught:
        ckptavg.select([tmp_path / "missing"], **options)
    assert "--" not in str(caught.value)


def test_inspect_and_diff_check_their_values(tmp_path):
    with pytest.raises(UsageError, match=r"^pattern='\[': not a regular expression \(unterminated character set"):
        ckptavg.inspect(tmp_path / "missing", tensors=True, pattern="[")
    with pytest.raises(UsageError, match=r"^path None: expected a path"):
        ckptavg.inspect(None)
    with pytest.raises(UsageError, match=r"^strip_prefixes=\[b'x'\]: expected strings"):
        ckptavg.diff(tmp_path / "a", tmp_path / "b", strip_prefixes=[b"x"])


# --- select, inspect and diff return the reports the commands print ------------------------------------------


def test_select_returns_the_selection_the_command_prints(hf_run, cli):
    folders = sorted(hf_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    selection = ckptavg.select(folders, metric="eval_loss", top_k=2, last=1)
    losses = eval_losses(hf_run)
    best = sorted(losses, key=losses.get)[:2]
    expected = sorted({*best, max(losses)})
    assert [c.step for c in selection.chosen] == expected
    assert isinstance(selection, ckptavg.Selection)
    printed = json.loads(cli("select", *folders, "--metric", "eval_loss", "--top-k", "2", "--last", "1", "--json", "-q").out)
    assert printed["chosen"] == [c.path for c in selection.chosen]
    assert ckptavg.select(folders, metric="no_such_metric", top_k=1).chosen == []  # not an error here


def test_inspect_returns_the_report_the_command_prints(hf_run, cli):
    folder = hf_run / "checkpoint-6"
    report = ckptavg.inspect(folder, tensors=True, pattern=r"\.attn\.")
    assert isinstance(report, ckptavg.InspectReport)
    assert (
        report.step == 6
        and report.step_source == "folder name"
        and report.metrics["eval_loss"] == pytest.approx(eval_losses(hf_run)[6])
    )
    stored = load_file(folder / "model.safetensors")
    assert {t.name for t in report.tensor_list} == {n for n in stored if ".attn." in n}
    assert report.parameters == sum(t.numel() for t in stored.values())
    printed = json.loads(cli("inspect", folder, "--tensors", "--filter", r"\.attn\.", "--json").out)
    assert printed == json.loads(json.dumps(report.to_dict()))


def test_diff_matches_a_float64_reference(hf_run):
    a, b = hf_run / "checkpoint-4", hf_run / "checkpoint-8"
    report = ckptavg.diff(a, b)
    assert isinstance(report, ckptavg.DiffReport)
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    floating = [n for n in sa if sa[n].is_floating_point()]
    dd = sum(float(((sa[n].double() - sb[n].double()) ** 2).sum()) for n in floating)
    aa = sum(float((sa[n].double() ** 2).sum()) for n in floating)
    assert report.compared == len(sa) and report.relative == pytest.approx(math.sqrt(dd / aa), rel=1e-12)
    assert ckptavg.diff(a, a).identical


# --- round trips: what ckptavg wrote is read back with its step ----------------------------------------------


def test_exports_keep_their_step_and_average_in_order(hf_run, tmp_path, cli):
    four, eight = hf_run / "checkpoint-4", hf_run / "checkpoint-8"
    ckptavg.export(four, tmp_path / "e4")
    ckptavg.export(eight, tmp_path / "e8.safetensors")
    ckptavg.export(eight, tmp_path / "e8.pt")
    shown = json.loads(cli("inspect", tmp_path / "e4", "--json").out)
    assert (shown["step"], shown["step_source"]) == (4, "ckptavg.json (exported from step 4)")
    assert ckptavg.inspect(tmp_path / "e8.safetensors").step_source == "ckptavg metadata (exported from step 8)"
    assert ckptavg.inspect(tmp_path / "e8.pt").step == 8

    # given newest first: ordered by the steps read back, then weighted 1, 2
    report = ckptavg.average([tmp_path / "e8.safetensors", tmp_path / "e4"], tmp_path / "avg", weights="linear")
    assert report.order == "step" and [(Path(i.path).name, i.step) for i in report.inputs] == [("e4", 4), ("e8.safetensors", 8)]
    x4, x8 = load_file(four / "model.safetensors"), load_file(eight / "model.safetensors")
    expected = reference_average([x4, x8], [1.0, 2.0])
    out = read_output(tmp_path / "avg")
    assert out.keys() == expected.keys() and all(torch.equal(out[n], expected[n]) for n in expected)

    again = ckptavg.inspect(tmp_path / "avg")
    assert (again.step, again.step_source) == (8, "ckptavg.json (averaged from 2 checkpoints, the newest at step 8)")
    result = cli("average", tmp_path / "e8.pt", tmp_path / "e4", "--weights", "linear", "-o", tmp_path / "avg2", "--json", "-q")
    assert result.code == 0, result.err
    assert [i["step"] for i in json.loads(result.out)["inputs"]] == [4, 8]
