"""`ckptavg average` under torchrun: throughput against the number of processes, beside the read floor; a
simulation of many nodes (ranks throttled to a per-node bandwidth) against the model of docs/distributed.md; and
ckptavg's split of 10 x 70B checkpoints among many ranks.

    python scripts/torchrun_bench.py --models 8 --size-gb 1 --dir /tmp/ckptavg-bench-tr [--procs 1,2,4] \
        [--caches cold,warm] [--repeat 3] [--no-fsync] [--max-shard-size 200MB] [--parts bench,sim,split] \
        [--sim-models 6 --sim-size-gb 0.36 --sim-node-mbps 100 --sim-fs-mbps 200 --sim-rows LABELS --sim-omp N] \
        [--split-inputs 10 --split-worlds 8,64,512] [--json results.json]

Part `bench`. Inputs are bench.py's (scripts/bench.py: make_inputs, seeded Llama-shaped bf16 sharded safetensors
folders), made under DIR/bf16 or reused. --repeat rounds; each round runs every row once:
  startup floors  `python -c "import torch"`; for K > 1, torchrun starting K processes that import torch, join a
                  gloo group, pass a barrier and leave: what any torchrun job pays before reading a byte
then for each cache (cold: the inputs synced and evicted with posix_fadvise DONTNEED; warm: read once with cat):
  read floor      `cat` of every input file to /dev/null
  1 process       `python -m ckptavg average IN... -o OUT --quiet --json --max-shard-size 200MB`
  K processes     `python -m torch.distributed.run --standalone --nproc-per-node K -m ckptavg average ...` (same args)
Each ckptavg run is timed end to end under /usr/bin/time -v; the peak RSS (VmHWM) of every python process in its
tree is sampled from /proc every 50 ms, so the table gives the largest rank and the sum over the ranks (the
torchrun agent is in the JSON), beside /usr/bin/time's figure (for a process tree: the largest single process).
`own s` is ckptavg's own `seconds` (--json, rank 0). Every output's files (each safetensors shard, the index,
config.json; ckptavg.json but for `created` and `world_size`) are compared by sha256 with the round 1 1-process
output. The output is fsynced (the product default) unless --no-fsync.

Part `sim`: a smaller set (--sim-models x --sim-size-gb; make_inputs' smallest shape is 0.36 GB) on a warm cache,
with --no-fsync so that only reads are shaped, through scripts/throttled_ckptavg.py: each rank's reads throttled
to a simulated node link (--sim-node-mbps MB/s, shared by the ranks of a node) and optionally a filesystem-wide
limit (--sim-fs-mbps), for 1, 2 and 4 simulated nodes (1 rank each), 2 nodes of 2 ranks, and 2 and 4 nodes under
the filesystem limit (--sim-rows picks rows by label; --sim-omp sets OMP_NUM_THREADS, a rank's fold workers).
Each is compared with the model T = T0 + read_bytes / min(nodes x node_bw, fs_bw), T0 being the same number of
processes unthrottled (measured in the same rounds), and its read phase (the job's first throttled read to its
last) with read_bytes / min(nodes x node_bw, fs_bw).

Part `split`: ckptavg's own split_work and assign on a plan of --split-inputs Llama-2-70B-shaped bf16 checkpoints
(built from shapes, no file read): units, bytes per rank and their imbalance, files each rank touches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (scripts/bench.py: inputs, eviction, the cat floor)

from ckptavg.verify import sha256_of  # noqa: E402  (bench put the project on the path)

PY = sys.executable
TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = str(bench.ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env | (extra or {})


def launcher(procs: int, module_or_script: list[str]) -> list[str]:
    """The command that starts `procs` processes of module_or_script (["-m", "ckptavg"] or [script])."""
    if procs == 1:
        return [PY, *module_or_script]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *module_or_script]


# ---------------------------------------------------------------------------------------------- running


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                found.extend(int(k) for k in kids)
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return found


def proc_info(pid: int) -> tuple[str, int] | None:
    """(role, VmHWM bytes) of a python process of the job: 'rank R', 'agent' (torchrun) or 'main'."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not cmdline or "python" not in os.path.basename(cmdline[0].decode(errors="replace")):
            return None
        status = Path(f"/proc/{pid}/status").read_text()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    if not hwm:
        return None
    rank = next((e[5:].decode() for e in environ if e.startswith(b"RANK=")), None)
    if rank is not None:
        role = f"rank {rank}"
    elif b"torch.distributed.run" in b" ".join(cmdline):
        role = "agent"
    else:
        role = "main"
    return role, int(hwm.group(1)) * 1024


def run_job(cmd: list[str], env: dict[str, str]) -> dict:
    """Run cmd under /usr/bin/time -v, sampling the peak RSS of every python process in its tree."""
    peaks: dict[str, int] = {}
    load = float(Path("/proc/loadavg").read_text().split()[0])  # the machine is shared: what else ran (1-min load average)
    started = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in descendants(proc.pid):
                info = proc_info(pid)
                if info:
                    peaks[info[0]] = max(peaks.get(info[0], 0), info[1])
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    tree_max = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    report = None
    if "{" in out:
        try:
            report = json.loads(out[out.index("{") :])
        except json.JSONDecodeError:
            report = None
    ranks = {k: v for k, v in peaks.items() if k.startswith("rank") or k == "main"}
    return {
        "wall": wall,
        "time_v_max_rss": tree_max,
        "rss": peaks,
        "rss_ranks_max": max(ranks.values(), default=0),
        "rss_ranks_sum": sum(ranks.values()),
        "loadavg_before": load,
        "report": report,
        "stderr_tail": err[-600:],
    }


def output_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of an output folder; ckptavg.json without its `created` and `world_size`."""
    hashes = {}
    for f in sorted(out.iterdir()):
        if f.name == "ckptavg.json":
            recipe = json.loads(f.read_text())
            recipe.pop("created", None)
            recipe.pop("world_size", None)
            hashes[f.name] = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
            continue
        hashes[f.name] = sha256_of(f)
    return hashes


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# ---------------------------------------------------------------------------------------------- part 1


def bench_part(args: argparse.Namespace, results: dict) -> None:
    paths = bench.make_inputs(args.dir / "bf16", "bf16", args.models, args.size_gb)
    files = bench.input_files(paths)
    total = bench.weight_bytes(paths)
    out, ref = args.dir / "out", args.dir / "ref-1proc"
    shutil.rmtree(ref, ignore_errors=True)
    flags = ["--quiet", "--json", "--max-shard-size", args.max_shard_size] + (["--no-fsync"] if args.no_fsync else [])
    ckptavg = ["-m", "ckptavg", "average", *map(str, paths), "-o", str(out), *flags]
    rows: dict[tuple[str, str], list[dict]] = {}
    reference: dict[str, str] | None = None
    startup_cmd = {1: [PY, "-c", "import torch"]}
    for k in args.procs:
        if k > 1:
            startup_cmd[k] = [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(k),
                "--no-python",
                PY,
                "-c",
                "import torch, torch.distributed as d; d.init_process_group('gloo'); d.barrier(); d.destroy_process_group()",
            ]
    for round_ in range(args.repeat):
        for k in args.procs:
            r = run_job(startup_cmd[k], clean_env())
            rows.setdefault((f"startup floor, {k} proc", "-"), []).append(r)
            print(
                f"  round {round_ + 1}: startup floor {k} proc: {r['wall']:.2f} s, max rank {r['rss_ranks_max'] / 1e9:.2f} GB",
                file=sys.stderr,
            )
        for cache in args.caches:
            bench.evict(files) if cache == "cold" else bench.warm(files)
            wall, _ = bench.timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
            rows.setdefault(("read floor (cat)", cache), []).append({"wall": wall})
            print(f"  round {round_ + 1}: cat {cache}: {wall:.2f} s", file=sys.stderr)
            for k in args.procs:
                shutil.rmtree(out, ignore_errors=True)
                bench.evict(files) if cache == "cold" else bench.warm(files)
                r = run_job(launcher(k, ckptavg), clean_env())
                hashes = output_hashes(out)
                if reference is None:
                    assert k == 1, "the first run must be the 1-process reference"
                    reference = hashes
                    shutil.copytree(out, ref) if args.keep_reference else None
                r["identical"] = hashes == reference
                r["differs"] = sorted(n for n in set(hashes) | set(reference) if hashes.get(n) != reference.get(n))
                r["files"] = len(hashes)
                shutil.rmtree(out, ignore_errors=True)
                rows.setdefault((f"ckptavg, {k} proc", cache), []).append(r)
                inner = r["report"]["seconds"] if r["report"] else float("nan")
                print(
                    f"  round {round_ + 1}: {k} proc {cache}: {r['wall']:.2f} s (ckptavg's own {inner:.2f} s), "
                    f"ranks max {r['rss_ranks_max'] / 1e9:.2f} GB sum {r['rss_ranks_sum'] / 1e9:.2f} GB, "
                    f"time -v {r['time_v_max_rss'] / 1e9:.2f} GB, identical {r['identical']}",
                    file=sys.stderr,
                )
    floors = {cache: statistics.median(x["wall"] for x in rows[("read floor (cat)", cache)]) for cache in args.caches}
    title = (
        f"bf16: {args.models} x {args.size_gb:g} GB sharded safetensors, {total / 1e9:.2f} GB read, "
        f"output in {args.max_shard_size} shards, fsync {'off (--no-fsync)' if args.no_fsync else 'on'}, {os.cpu_count()} cores, "
        f"median of {args.repeat} (min-max), "
        f"x floor = over the cat floor of the same cache ({', '.join(f'{c} {v:.2f} s' for c, v in floors.items())})"
    )
    print(f"\n{title}")
    head = (
        f"{'':24s} {'cache':5s} {'median s':>8s} {'min-max s':>12s} {'GB/s':>5s} {'x floor':>7s} {'own s':>6s} {'rank max':>8s} "
        f"{'rank sum':>8s} {'time -v':>7s}  identical"
    )
    print(head)
    table = []
    for (label, cache), runs in rows.items():
        walls = [x["wall"] for x in runs]
        s = stats(walls)
        line = {"label": label, "cache": cache, "wall": s, "gb_per_s": total / s["median"] / 1e9}
        text = f"{label:24s} {cache:5s} {s['median']:8.2f} {s['min']:5.2f}-{s['max']:<6.2f} "
        if label.startswith("ckptavg") or label.startswith("read"):
            text += f"{total / s['median'] / 1e9:5.2f} {s['median'] / floors[cache]:7.2f} "
            line["x_floor"] = s["median"] / floors[cache]
        else:
            text += f"{'-':>5s} {'-':>7s} "
        if "rss" in runs[0]:
            own = [x["report"]["seconds"] for x in runs if x.get("report")]
            line |= {
                "own_seconds": stats(own) if own else None,
                "rss_ranks_max": max(x["rss_ranks_max"] for x in runs),
                "rss_ranks_sum": max(x["rss_ranks_sum"] for x in runs),
                "time_v_max_rss": max(x["time_v_max_rss"] for x in runs),
                "rss_by_process": runs[-1]["rss"],
            }
            text += f"{statistics.median(own) if own else float('nan'):6.2f} " if own else f"{'-':>6s} "
            text += (
                f"{line['rss_ranks_max'] / 1e9:5.2f} GB {line['rss_ranks_sum'] / 1e9:5.2f} GB "
                f"{line['time_v_max_rss'] / 1e9:4.2f} GB"
            )
        if "identical" in runs[0]:
            line["identical"] = all(x["identical"] for x in runs)
            line["differs"] = sorted({d for x in runs for d in x["differs"]})
            line["files_compared"] = runs[0]["files"]
            text += f"  {'yes' if line['identical'] else 'NO: ' + ','.join(line['differs'])} ({runs[0]['files']} files)"
        print(text)
        table.append(line)
    results["bench"] = {
        "title": title,
        "read_bytes": total,
        "floors": floors,
        "rows": table,
        "reference_hashes": reference,
        "runs": {f"{k[0]} | {k[1]}": v for k, v in rows.items()},
    }


# ---------------------------------------------------------------------------------------------- part 2


def sim_part(args: argparse.Namespace, results: dict) -> None:
    root = args.dir / f"sim-{args.sim_models}x{args.sim_size_gb:g}gb"
    paths = bench.make_inputs(root, "bf16", args.sim_models, args.sim_size_gb)
    files = bench.input_files(paths)
    total = bench.weight_bytes(paths)
    out = args.dir / "sim-out"
    node_bw, fs_bw = args.sim_node_mbps * 1e6, args.sim_fs_mbps * 1e6
    script = [
        str(bench.ROOT / "scripts" / "throttled_ckptavg.py"),
        "average",
        *map(str, paths),
        "-o",
        str(out),
        "--quiet",
        "--json",
        "--no-fsync",
    ]
    # (label, processes, ranks per node, node bytes/s, fs bytes/s)
    configs = [
        ("1 node", 1, 1, node_bw, 0.0),
        ("2 nodes", 2, 1, node_bw, 0.0),
        ("4 nodes", 4, 1, node_bw, 0.0),
        ("2 nodes x 2 ranks", 4, 2, node_bw, 0.0),
    ]
    if fs_bw:
        configs += [
            (f"2 nodes, fs {args.sim_fs_mbps:g} MB/s", 2, 1, node_bw, fs_bw),
            (f"4 nodes, fs {args.sim_fs_mbps:g} MB/s", 4, 1, node_bw, fs_bw),
        ]
    if args.sim_rows:
        configs = [c for c in configs if c[0] in args.sim_rows.split(",")]
    omp = {"OMP_NUM_THREADS": str(args.sim_omp)} if args.sim_omp else {}
    runs: dict[str, list[dict]] = {}
    bench.warm(files)
    for round_ in range(args.repeat):
        for procs in sorted({c[1] for c in configs}):  # the unthrottled time: startup + the work on this machine
            shutil.rmtree(out, ignore_errors=True)
            r = run_job(
                launcher(procs, script),
                clean_env(omp | {"CKPTAVG_SIM_NODE_BW": "0", "CKPTAVG_SIM_DIR": str(args.dir / "sim-q" / f"u{procs}-{round_}")}),
            )
            runs.setdefault(f"unthrottled, {procs} proc", []).append(r)
            print(f"  sim round {round_ + 1}: unthrottled {procs} proc: {r['wall']:.2f} s", file=sys.stderr)
        for label, procs, per_node, nbw, fbw in configs:
            shutil.rmtree(out, ignore_errors=True)
            queues = args.dir / "sim-q" / f"{label.replace(' ', '_').replace(',', '')}-{round_}"
            shutil.rmtree(queues, ignore_errors=True)
            env = clean_env(
                omp
                | {
                    "CKPTAVG_SIM_NODE_BW": str(nbw),
                    "CKPTAVG_SIM_RANKS_PER_NODE": str(per_node),
                    "CKPTAVG_SIM_FS_BW": str(fbw),
                    "CKPTAVG_SIM_DIR": str(queues),
                }
            )
            r = run_job(launcher(procs, script), env)
            r["ranks"] = [json.loads((queues / f"rank-{i}.json").read_text()) for i in range(procs)]
            runs.setdefault(label, []).append(r)
            per_rank = ", ".join(f"{x['bytes'] / 1e9:.3f} GB in {x['last'] - x['first']:.1f} s" for x in r["ranks"])
            print(f"  sim round {round_ + 1}: {label}: {r['wall']:.2f} s; ranks read {per_rank}", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(args.dir / "sim-q", ignore_errors=True)
    title = (
        f"simulation: {args.sim_models} x {args.sim_size_gb:g} GB bf16, {total / 1e9:.2f} GB read, warm cache, --no-fsync, "
        f"node link {args.sim_node_mbps:g} MB/s{f', filesystem {args.sim_fs_mbps:g} MB/s where stated' if fs_bw else ''}, "
        f"median of {args.repeat}, OMP_NUM_THREADS {args.sim_omp or 'torchrun default (1 when K > 1)'}; "
        f"model = startup (same processes unthrottled) + read bytes / min(nodes x node link, filesystem)"
    )
    print(f"\n{title}")
    print(
        f"{'':22s} {'procs':>5s} {'bandwidth':>10s} {'model s':>7s} {'wall s':>6s} {'min-max s':>12s} {'ratio':>5s} "
        f"{'read model s':>12s} {'read phase s':>12s} {'min-max s':>12s} {'ratio':>5s} {'bytes max/mean':>14s}"
    )
    table = []
    for label, procs, per_node, nbw, fbw in configs:
        nodes = procs // per_node
        bw = min(nodes * nbw, fbw) if fbw else nodes * nbw
        startup = statistics.median(x["wall"] for x in runs[f"unthrottled, {procs} proc"])
        model = startup + total / bw
        s = stats([x["wall"] for x in runs[label]])
        spans = [[x["last"] - x["first"] for x in r["ranks"]] for r in runs[label]]
        loads = [x["bytes"] for x in runs[label][-1]["ranks"]]
        imbalance = max(loads) / (sum(loads) / len(loads))
        # the read phase: from the job's first throttled read to its last (CLOCK_MONOTONIC is the same in every process)
        phase = stats([max(x["last"] for x in r["ranks"]) - min(x["first"] for x in r["ranks"]) for r in runs[label]])
        read_model = total / bw
        print(
            f"{label:22s} {procs:5d} {bw / 1e6:6.0f} MB/s {model:7.2f} {s['median']:6.2f} {s['min']:5.2f}-{s['max']:<6.2f} "
            f"{s['median'] / model:5.2f} {read_model:12.2f} {phase['median']:12.2f} {phase['min']:5.2f}-{phase['max']:<6.2f} "
            f"{phase['median'] / read_model:5.2f} {imbalance:14.3f}"
        )
        table.append(
            {
                "label": label,
                "procs": procs,
                "ranks_per_node": per_node,
                "nodes": nodes,
                "node_bw": nbw,
                "fs_bw": fbw,
                "bandwidth": bw,
                "startup": startup,
                "model": model,
                "wall": s,
                "ratio": s["median"] / model,
                "read_model": read_model,
                "read_phase": phase,
                "read_ratio": phase["median"] / read_model,
                "rank_bytes": loads,
                "rank_read_spans": spans,
                "imbalance": imbalance,
            }
        )
    for procs in sorted({c[1] for c in configs}):
        s = stats([x["wall"] for x in runs[f"unthrottled, {procs} proc"]])
        print(f"{'unthrottled':22s} {procs:5d} {'-':>10s} {'-':>7s} {s['median']:6.2f} {s['min']:5.2f}-{s['max']:<6.2f}")
        table.append({"label": "unthrottled", "procs": procs, "wall": s})
    results["sim"] = {
        "title": title,
        "read_bytes": total,
        "rows": table,
        "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "stderr_tail"} for r in v] for k, v in runs.items()},
    }
    if not args.keep_sim_inputs:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- part 3


def llama70b_shapes() -> dict[str, tuple[int, ...]]:
    """Llama-2-70B's tensors (hidden 8192, MLP 28672, 80 layers, 8 KV heads of 128, vocabulary 32000)."""
    h, i, kv, v = 8192, 28672, 1024, 32000
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(80):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def split_part(args: argparse.Namespace, results: dict) -> None:
    """How ckptavg's own split_work/assign share N x 70B bf16 checkpoints (15 input shards each, 5 GB output
    shards, the default) among the ranks: no file is read, the plan is built from the shapes."""
    import torch

    from ckptavg.distributed import assign, split_work
    from ckptavg.formats.base import TensorSource
    from ckptavg.formats.writer import TensorSpec, split_shards
    from ckptavg.merge.plan import Plan, PlanEntry

    shapes = llama70b_shapes()
    n_inputs, input_shards = args.split_inputs, 15
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    per_shard = -(-total // input_shards)
    where, at, shard = {}, 0, 0
    for name, shape in shapes.items():  # tensors laid into 15 files of about total/15 bytes, in order
        nbytes = 2 * torch.Size(shape).numel()
        if at and at + nbytes > per_shard:
            shard, at = shard + 1, 0
        where[name] = (shard, at)
        at += nbytes
    entries = [
        PlanEntry(
            name,
            torch.bfloat16,
            shape,
            [
                TensorSource(Path(f"/ckpt/{k}/model-{where[name][0] + 1:05d}.safetensors"), where[name][1], "bfloat16", shape)
                for k in range(n_inputs)
            ],
            [1.0] * n_inputs,
            float(n_inputs),
            torch.float32,
        )
        for name, shape in shapes.items()
    ]
    plan = Plan([], None, entries)  # type: ignore[arg-type]
    out_shards = split_shards([TensorSpec(e.name, e.dtype, e.shape) for e in entries], 5_000_000_000)
    out_file = {spec.name: j for j, sh in enumerate(out_shards) for spec in sh}
    rows = []
    print(
        f"\nsplit: {n_inputs} x {total / 1e9:.1f} GB bf16 (Llama-2-70B shapes, {len(shapes)} tensors, "
        f"{shard + 1} input shards each, {len(out_shards)} output shards of <= 5 GB): ckptavg's split_work + assign, per rank"
    )
    print(
        f"{'ranks':>6s} {'units':>6s} {'unit GB max':>11s} {'read GB/rank':>12s} {'max/mean':>8s} {'units/rank':>10s} "
        f"{'input files/rank':>16s} {'output files/rank':>17s}"
    )
    for world in args.split_worlds:
        started = time.perf_counter()
        units = split_work(plan, world)
        shares = assign(units, world)
        seconds = time.perf_counter() - started
        loads = [sum(u.read_bytes for u in sh) for sh in shares]
        in_files = [len({(k, where[entries[u.entry].name][0]) for u in sh for k in range(n_inputs)}) for sh in shares]
        out_files = [len({out_file[entries[u.entry].name] for u in sh}) for sh in shares]
        mean = sum(loads) / world
        row = {
            "ranks": world,
            "units": len(units),
            "unit_bytes_max": max(u.read_bytes for u in units),
            "read_mean": mean,
            "read_max": max(loads),
            "imbalance": max(loads) / mean,
            "units_per_rank": [min(map(len, shares)), max(map(len, shares))],
            "input_files_per_rank": [min(in_files), max(in_files)],
            "output_files_per_rank": [min(out_files), max(out_files)],
            "split_seconds": seconds,
        }
        rows.append(row)
        print(
            f"{world:6d} {len(units):6d} {row['unit_bytes_max'] / 1e9:11.2f} {mean / 1e9:12.2f} {row['imbalance']:8.4f} "
            f"{min(map(len, shares)):4d}-{max(map(len, shares)):<5d} {min(in_files):8d}-{max(in_files):<7d} "
            f"{min(out_files):8d}-{max(out_files):<8d}"
        )
    results["split"] = {
        "inputs": n_inputs,
        "checkpoint_bytes": total,
        "input_shards": shard + 1,
        "output_shards": len(out_shards),
        "tensors": len(shapes),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("/tmp/ckptavg-bench-tr"),
        help="inputs under DIR/bf16 (made or reused), outputs beside them",
    )
    parser.add_argument("--procs", default="1,2,4", help="numbers of processes; the first must be 1 (the reference output)")
    parser.add_argument("--caches", default="cold,warm")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each round runs every row once")
    parser.add_argument("--no-fsync", action="store_true", help="pass --no-fsync to ckptavg (default: fsync on, as the product)")
    parser.add_argument(
        "--max-shard-size", default="200MB", help="ckptavg's --max-shard-size: several output shards and an index to compare"
    )
    parser.add_argument("--keep-reference", action="store_true", help="keep the 1-process output in DIR/ref-1proc")
    parser.add_argument("--parts", default="bench,sim,split", help="bench, sim, split (any of them, comma-separated)")
    parser.add_argument("--split-inputs", type=int, default=10, help="split: number of 70B checkpoints")
    parser.add_argument("--split-worlds", default="8,64,512", help="split: world sizes")
    parser.add_argument("--sim-models", type=int, default=6)
    parser.add_argument(
        "--sim-size-gb", type=float, default=0.36, help="per input (make_inputs' smallest Llama shape is 0.36 GB)"
    )
    parser.add_argument("--sim-node-mbps", type=float, default=100.0, help="simulated node link, MB/s (1e6 bytes)")
    parser.add_argument(
        "--sim-fs-mbps", type=float, default=200.0, help="simulated filesystem limit for the last rows, MB/s; 0: none"
    )
    parser.add_argument("--keep-sim-inputs", action="store_true")
    parser.add_argument("--sim-rows", help="only these simulated rows (labels, comma-separated), e.g. '2 nodes,4 nodes'")
    parser.add_argument(
        "--sim-omp", type=int, help="OMP_NUM_THREADS for every simulated run (a rank's fold workers); default torchrun's"
    )
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    args.procs = [int(x) for x in args.procs.split(",")]
    args.caches = args.caches.split(",")
    args.split_worlds = [int(x) for x in args.split_worlds.split(",")]
    if args.procs[0] != 1:
        parser.error("--procs must start with 1: the 1-process output is the reference")
    args.dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"argv": sys.argv, "cores": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M")}
    parts = args.parts.split(",")
    try:
        if "bench" in parts:
            bench_part(args, results)
        if "sim" in parts:
            sim_part(args, results)
        if "split" in parts:
            split_part(args, results)
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
