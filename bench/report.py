"""Plots and ``RESULTS.md`` from the JSON files of one results folder.

``python -m bench.report bench/results/<machine>`` rebuilds them; ``bench.run``
and ``bench.train`` call the same functions after measuring.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .audit import format_audit  # noqa: E402

STYLE = {  # one colour per contender across every plot
    "mlbfgs-triton": "tab:red", "mlbfgs-foreach": "tab:orange", "mlbfgs": "tab:red", "mlbfgs-released": "tab:pink",
    "mlbfgs-triton-released": "tab:pink", "mlbfgs-triton-graph": "darkred", "mlbfgs-triton-bf16-history": "salmon",
    "mlbfgs-cuda": "tab:cyan", "mlbfgs-cuda-bf16-history": "lightblue", "mlbfgs-cpp": "tab:cyan",
    "mlbfgs-cpp-bf16-history": "lightblue", "mlbfgs-cpp-released": "tab:pink",
    "authors-style": "tab:blue", "torch-lbfgs-direction": "tab:purple", "reference-fp32": "tab:brown",
    "adamw-foreach": "tab:green", "adamw-fused": "tab:olive", "adamw": "tab:green",
    "sgd-momentum": "tab:gray", "sgd-fused": "black",
}


def measured(rows: list[dict], key: str = "median_s") -> list[dict]:
    """The rows that hold a measurement: not skipped (memory plan, out of memory) or failed."""
    return [r for r in rows if key in r]


def not_run(row: dict) -> str | None:
    """Why a row holds no measurement: ``skipped: ...`` or ``error: ...``; None when it does."""
    for key in ("skipped", "error"):
        if key in row:
            return f"{key}: {row[key]}"
    return None


def _load(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt_n(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


# -- 1. kernels -------------------------------------------------------------------
def kernel_rows(kernels: dict) -> list[dict]:
    rows = []
    for b in kernels["benchmarks"]:
        info = b.get("extra_info", {})
        if "kernel" not in info:
            continue
        rows.append({**info, "median_s": b["stats"]["median"]})
    return rows


def plot_kernels(rows: list[dict], out: Path) -> None:
    steps = [r for r in rows if r["kernel"] == "step"]
    phases = [r for r in rows if r["kernel"] not in ("step", "copy")]
    if not steps:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (backend, m) in sorted({(r["backend"], r["m"]) for r in steps}):
        pts = sorted((r["n"], r["fraction_of_copy_bandwidth"]) for r in steps if (r["backend"], r["m"]) == (backend, m))
        axes[0].plot(*zip(*pts), marker="o", label=f"{backend} step, m={m}")
    copies = sorted((r["n"], r["fraction_of_copy_bandwidth"]) for r in rows if r["kernel"] == "copy")
    if copies:
        axes[0].plot(*zip(*copies), "k--", label="copy_ at that N")
    axes[0].set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel="floor bytes / time / copy bandwidth",
                title="Whole MLBFGS step vs the bandwidth floor")
    m_mid = sorted({r["m"] for r in phases})[len({r["m"] for r in phases}) // 2] if phases else None
    for kernel in sorted({r["kernel"] for r in phases}):
        pts = sorted((r["n"], r["fraction_of_copy_bandwidth"]) for r in phases if r["kernel"] == kernel and r["m"] == m_mid)
        axes[1].plot(*zip(*pts), marker="o", label=kernel)
    axes[1].set(xscale="log", xlabel="N (parameters)", ylabel="fraction of copy bandwidth",
                title=f"Phases of the foreach backend (m={m_mid})")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kernels_bandwidth.png", dpi=110)
    plt.close(fig)


def kernels_table(rows: list[dict]) -> str:
    lines = ["| backend | N | m | kernel | median ms | floor MB | GB/s | % of copy bw |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["backend"], r["n"], r["m"], r["kernel"] != "step", r["kernel"])):
        lines.append(
            f"| {r['backend']} | {_fmt_n(r['n'])} | {r['m']} | {r['kernel']} | {_ms(r['median_s'])} "
            f"| {r['floor_bytes'] / 1e6:.1f} | {r['bytes_per_s'] / 1e9:.1f} | {100 * r['fraction_of_copy_bandwidth']:.1f} |"
        )
    return "\n".join(lines)


# -- 2. step comparison -----------------------------------------------------------
def plot_steps(compare: dict, out: Path) -> None:
    rows = measured(compare["rows"])
    if not rows:
        return
    default_m = statistics.mode(r["m"] for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["contender"] for r in rows):
        pts = sorted((r["n"], r["median_s"], r.get("time_vs_ours")) for r in rows
                     if r["contender"] == name and r["m"] == default_m)
        if not pts:
            continue
        ns, ts, ratios = zip(*pts)
        axes[0].plot(ns, np.array(ts) * 1e3, marker="o", color=STYLE.get(name), label=name)
        with_ratio = [(n, q) for n, q in zip(ns, ratios) if q is not None]
        if with_ratio:
            axes[1].plot(*zip(*with_ratio), marker="o", color=STYLE.get(name), label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel="median step time (ms)",
                title=f"One optimizer step (m={default_m})")
    axes[1].set(xscale="log", yscale="log", xlabel="N (parameters)", ylabel=f"time / time of {compare['ours']}",
                title="Step time relative to ours")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)


def steps_table(compare: dict) -> str:
    lines = ["| N | m | contender | median ms | time / ours | % of copy bw (algorithm floor) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in compare["rows"]:
        why = not_run(r)
        if why is not None:
            lines.append(f"| {_fmt_n(r['n'])} | {r['m']} | {r['contender']} | {why.replace('|', '/')} | - | - |")
            continue
        ratio = f"{r['time_vs_ours']:.2f}" if r.get("time_vs_ours") is not None else "-"
        lines.append(
            f"| {_fmt_n(r['n'])} | {r['m']} | {r['contender']} | {_ms(r['median_s'])} | {ratio} "
            f"| {100 * r['fraction_of_copy_bandwidth']:.1f} |"
        )
    return "\n".join(lines)


# -- 3. memory --------------------------------------------------------------------
def plot_memory(memory: dict, out: Path) -> None:
    rows = measured(memory["rows"], "peak_bytes")
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = sorted((r["n"], r["peak_bytes"]) for r in rows if r["contender"] == name)
        nonzero = [(n, b) for n, b in mine if b > 0]
        label = name if nonzero else f"{name} (0 bytes)"
        if nonzero:
            axes[0].plot(*zip(*nonzero), marker="o", color=STYLE.get(name), label=label)
        axes[1].plot([n for n, _ in mine], [b / n for n, b in mine], marker="o", color=STYLE.get(name), label=label)
    ns = sorted({r["n"] for r in rows})
    axes[0].plot(ns, [4 * n for n in ns], "k:", label="4 N bytes (one fp32 vector)")
    axes[0].set(xscale="log", yscale="log", ylabel="peak bytes above steady state",
                title=f"Peak transient memory of one step (m={memory['m']})")
    axes[1].set(xscale="log", ylabel="peak bytes per parameter", title="The same, per parameter")
    for ax in axes:
        ax.set_xlabel("N (parameters)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory_peak.png", dpi=110)
    plt.close(fig)


def plan_over_measured(r: dict) -> float | None:
    """The memory plan's estimate over the measured bytes (held plus the larger of the
    build's and the step's transients); at least 1 when the plan is safe."""
    if "planned_state_bytes" not in r or "own_state_bytes" not in r:
        return None
    used = r["own_state_bytes"] + max(r.get("build_transient_bytes", 0), r["peak_bytes"])
    return (r["planned_state_bytes"] + r["planned_step_bytes"]) / used


def memory_table(memory: dict) -> str:
    rows = memory["rows"]
    ns = sorted({r["n"] for r in rows})
    cuda = any("cuda_peak_bytes" in r for r in rows)
    head = "| contender | " + " | ".join(f"peak B/param N={_fmt_n(n)}" for n in ns) + " | state B/param | plan / measured |"
    if cuda:
        head += " tracker / CUDA peak |"
    lines = [head, "|" + " --- |" * (len(ns) + 3 + cuda)]
    notes = []
    for name in dict.fromkeys(r["contender"] for r in rows):
        mine = {r["n"]: r for r in rows if r["contender"] == name}
        cells = []
        for n in ns:
            r = mine.get(n)
            if r is None:
                cells.append("")
            elif not_run(r):
                cells.append("skipped" if "skipped" in r else "error")
                notes.append(f"- {name}, N={_fmt_n(n)}: {not_run(r)}")
            else:
                cells.append(f"{r['peak_bytes_per_param']:.1f}")
        done = [mine[n] for n in ns if n in mine and not not_run(mine[n])]
        last = done[-1] if done else None  # the largest N measured
        line = f"| {name} | " + " | ".join(cells)
        line += f" | {last['state_bytes_per_param']:.1f} |" if last else " | - |"
        ratio = plan_over_measured(last) if last else None
        line += f" {ratio:.2f} |" if ratio is not None else " - |"
        if cuda:
            peak = last.get("cuda_peak_bytes") if last else None
            line += f" {last['tracker_peak_bytes'] / peak:.3f} |" if peak else " - |"
        lines.append(line)
    return "\n".join(lines + ([""] + notes if notes else []))


# -- 5. training ------------------------------------------------------------------
def _band(runs, x_key, y_key):
    """Mean and min/max over seeds on the first run's x grid (step grids agree across seeds)."""
    length = min(len(r[y_key]) for r in runs)
    x = np.array(runs[0][x_key][:length]) if x_key.endswith("step") else np.mean([r[x_key][:length] for r in runs], axis=0)
    ys = np.array([r[y_key][:length] for r in runs])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def plot_training(training: dict, out: Path) -> None:
    runs = training["runs"]
    for model in dict.fromkeys(r["model"] for r in runs):
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        for opt in dict.fromkeys(r["optimizer"] for r in runs):
            mine = [r for r in runs if r["model"] == model and r["optimizer"] == opt]
            for col, (x_key, ex_key) in enumerate((("step", "eval_step"), ("time_s", "eval_time_s"))):
                for row, (xk, yk) in enumerate(((x_key, "train_loss"), (ex_key, "test_acc"))):
                    x, mean, lo, hi = _band(mine, xk, yk)
                    ax = axes[row, col]
                    ax.plot(x, mean, color=STYLE.get(opt), label=opt, marker="o" if row else None, ms=3)
                    ax.fill_between(x, lo, hi, color=STYLE.get(opt), alpha=0.2)
        for col, xlabel in enumerate(("steps", "training wall-clock (s)")):
            axes[0, col].set(xlabel=xlabel, ylabel="train loss (running mean)", yscale="log")
            axes[1, col].set(xlabel=xlabel, ylabel="test accuracy")
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        seeds = len(training["seeds"])
        fig.suptitle(f"{model.upper()} on {training['dataset']}: mean and min-max over {seeds} seeds")
        fig.tight_layout()
        fig.savefig(out / f"training_{model}.png", dpi=100)
        plt.close(fig)


def training_table(training: dict) -> str:
    runs = training["runs"]
    lines = ["| model | optimizer | epochs | final test acc (mean ± std) | min - max | train time s (mean) | median step ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for model in dict.fromkeys(r["model"] for r in runs):
        for opt in dict.fromkeys(r["optimizer"] for r in runs):
            mine = [r for r in runs if r["model"] == model and r["optimizer"] == opt]
            accs = [r["final_test_acc"] for r in mine]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            name = opt + (f" ({mine[0]['backend']})" if mine[0].get("backend") else "")
            lines.append(
                f"| {model} | {name} | {mine[0]['epochs']} | {100 * statistics.mean(accs):.2f} ± {100 * std:.2f} "
                f"| {100 * min(accs):.2f} - {100 * max(accs):.2f} | {statistics.mean(r['train_time_s'] for r in mine):.1f} "
                f"| {statistics.median(r.get('median_step_ms', float('nan')) for r in mine):.2f} |"
            )
    return "\n".join(lines)


# -- RESULTS.md -------------------------------------------------------------------
def headlines(compare, memory, training) -> list[str]:
    out = []
    if compare:
        rows = measured(compare["rows"])
        ours = compare["ours"]
        peers = ("authors-style", "torch-lbfgs-direction")
        default_m = statistics.mode(r["m"] for r in rows) if rows else None
        n_max = max((r["n"] for r in rows if r["contender"] in peers), default=None)
        for r in rows:
            if (r["n"], r["m"]) == (n_max, default_m) and r["contender"] in peers and r.get("time_vs_ours"):
                out.append(
                    f"- Step time at N={_fmt_n(n_max)}, m={r['m']}: {r['contender']} takes "
                    f"{r['time_vs_ours']:.2f}x the time of {ours} ({_ms(r['median_s'])} ms)."
                )
        mine = [r for r in rows if r["contender"] == ours and r["m"] == default_m]
        if mine:
            top = max(mine, key=lambda r: r["n"])
            out.append(f"- {ours} at N={_fmt_n(top['n'])}, m={top['m']}: {_ms(top['median_s'])} ms, "
                       f"{100 * top['fraction_of_copy_bandwidth']:.0f}% of the copy bandwidth.")
        graph = {(r["n"], r["m"]): r for r in rows if r["contender"].endswith("-graph")}
        eager = {(r["n"], r["m"]): r for r in rows if r["contender"] == ours}
        both = sorted(set(graph) & set(eager))
        if both:
            key = max(both)
            out.append(f"- CUDA graph replay at N={_fmt_n(key[0])}, m={key[1]}: {graph[key]['contender']} "
                       f"{_ms(graph[key]['median_s'])} ms, eager {ours} {_ms(eager[key]['median_s'])} ms.")
        missing = [r for r in compare["rows"] if not_run(r)]
        if missing:
            out.append(f"- {len(missing)} contender runs of the step comparison skipped or failed (section 2 says why).")
    if memory:
        done = measured(memory["rows"], "peak_bytes")
        n_max = max((r["n"] for r in done if r["kind"] != "ours"), default=None) or max((r["n"] for r in done), default=None)
        at = {r["contender"]: r for r in done if r["n"] == n_max}
        parts = [f"{name} {r['peak_bytes_per_param']:.1f}" for name, r in at.items()]
        if parts:
            out.append(f"- Peak transient memory of one step at N={_fmt_n(n_max)} (bytes per parameter above steady state): "
                       + ", ".join(parts) + ".")
    if training:
        best = {}
        for r in training["runs"]:
            best.setdefault((r["model"], r["optimizer"]), []).append(r["final_test_acc"])
        parts = [f"{m}/{o} {100 * statistics.mean(a):.2f}%" for (m, o), a in best.items()]
        out.append(f"- Final test accuracy on {training['dataset']} (mean over {len(training['seeds'])} seeds): " + ", ".join(parts) + ".")
    return out


def _cases_note(compare: dict) -> str:
    split = [c for c in compare.get("cases", []) if len(c["batches"]) > 1 or c.get("retried_alone")]
    ours_only = [c for c in compare.get("cases", []) if c.get("ours_only")]
    note = ""
    if ours_only:
        note += " Ours only: " + ", ".join(
            f"N={_fmt_n(c['n'])}, m={c['m']}" for c in ours_only) + "."
    if split:
        note += " Cases run in several batches: " + "; ".join(
            f"N={_fmt_n(c['n'])}, m={c['m']} in {len(c['batches']) + len(c.get('retried_alone', []))} "
            f"(budget {c['budget_bytes'] / 1e9:.3g} GB)" for c in split) + "."
    return note


def write_results_md(folder: Path, notes: list[str] | None = None) -> Path:
    kernels = _load(folder, "kernels.json")
    compare = _load(folder, "step_compare.json")
    memory = _load(folder, "memory.json")
    audit = _load(folder, "audit.json")
    training = _load(folder, "training.json")
    run = _load(folder, "run.json") or {}
    stamps = [d["machine"] for d in (compare, memory, audit, training, run) if d and "machine" in d]
    if kernels and kernels.get("mlbfgs_machine"):
        stamps.append(kernels["mlbfgs_machine"])
    stamp = stamps[0] if stamps else {}
    lines = [f"# Benchmark results: {stamp.get('slug', folder.name)}", ""]
    if stamp:
        lines += [
            f"- Machine: {stamp.get('gpu') or stamp.get('cpu')} ({stamp.get('cpu_count')} CPU cores, "
            f"{stamp.get('torch_threads')} torch threads); CPU {stamp.get('cpu')}",
            f"- torch {stamp.get('torch')}, triton {stamp.get('triton')}, CUDA {stamp.get('cuda')}, Python {stamp.get('python')}",
            f"- Commit {stamp.get('commit')}{' (with uncommitted changes)' if stamp.get('dirty') else ''}, {stamp.get('date')}",
        ]
        commits = {s.get("commit") for s in stamps}
        if len(commits) > 1:
            lines.append(f"- Note: the files of this folder come from several commits: {sorted(commits)}")
    if run.get("command"):
        lines.append(f"- Produced by: `{run['command']}` ({run.get('elapsed_s', 0) / 60:.1f} min)")
    for note in (notes or []) + run.get("notes", []):
        lines.append(f"- {note}")
    lines += ["", "## Headlines", ""] + headlines(compare, memory, training)
    if kernels:
        rows = kernel_rows(kernels)
        bw = next((r["copy_bandwidth_bytes_per_s"] for r in rows), None)
        lines += ["", "## 1. Kernel microbenchmarks (pytest-benchmark)", "",
                  f"Copy bandwidth measured in the same run: {bw / 1e9:.1f} GB/s (bytes read + written). "
                  "Floor bytes: each tensor the kernel must touch, read or written once (float32); "
                  "the whole step's floor is (16 m + 44) N (docs/design.md, \"Byte budget\"). Raw data: `kernels.json`.",
                  "", "![kernels](kernels_bandwidth.png)", "", kernels_table(rows)]
    if compare:
        lines += ["", "## 2. Whole step, side by side", "",
                  f"Copy bandwidth in this run: {compare['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s. "
                  "Same parameters (four weight tensors and their biases) and gradients for all; quasi-Newton "
                  "contenders start with m pairs held; medians of repeated steps after warm-up. "
                  "`% of copy bw` is the contender's own algorithm floor (mL-BFGS (16m+44)N, L-BFGS (16m+20)N, "
                  "AdamW 28N, SGD 20N) over time and bandwidth. The contenders of a case run in batches that fit "
                  "the free memory (`bench.planner`); a row says `skipped` when one did not fit or ran out of memory "
                  "on its own, `error` when it failed. `*-graph`: the step captured once in a CUDA graph, replayed."
                  + _cases_note(compare), "", "![step time](step_time.png)", "", steps_table(compare)]
    if memory:
        lines += ["", "## 3. Memory: in-place versus out-of-place", "",
                  "Peak bytes allocated during one steady-state `step()` above the memory in use before it "
                  "(CPU: `bench.memory.AllocationTracker`, a TorchDispatchMode; CUDA: `max_memory_allocated`, "
                  "with the tracker alongside), and the persistent optimizer state (history, EMAs, momentum, "
                  "scratch) per parameter. `plan / measured`: the memory plan's estimate for the contender over "
                  "what it held and allocated at its largest N (at least 1: the plan is safe).",
                  "", "![memory](memory_peak.png)", "", memory_table(memory)]
    if audit:
        lines += ["", "## 4. In-place audit", "",
                  f"N = {audit['numel']} in {len(audit['param_sizes'])} tensors; {audit.get('tracked_steps', 3)} tracked steps "
                  "after warm-up. Storage compared with `data_ptr()` across steps; temporaries at least as large "
                  "as the smallest weight tensor, from the allocation tracker.", "", format_audit(audit)]
    if training:
        lines += ["", "## 5. Training runs", "",
                  f"Data: {training['dataset']} ({training['train_size']} train / {training['test_size']} test), "
                  f"batch {training['batch_size']}, epochs {training['epochs']}, seeds {training['seeds']}; "
                  f"learning rate schedule: {training['schedule']}. The curves' test points use the first "
                  f"{training.get('eval_subset', 5000)} test images; the table's final accuracy the whole test set. Wall-clock counts training steps only (forward, backward, "
                  "optimizer step); the median step time is the steadier comparison on a shared machine.", "",
                  "Hyperparameters:", ""]
        lines += [f"- {name}: {json.dumps(h)}" for name, h in training["hyperparameters"].items()]
        lines += [f"- {name}: left out, {why}" for name, why in training.get("left_out", {}).items()]
        lines += ["", training_table(training), ""]
        lines += [f"![training {m}](training_{m}.png)" for m in dict.fromkeys(r["model"] for r in training["runs"])]
    roofline = _load(folder, "roofline.json")
    if roofline:
        from .roofline import markdown

        body = markdown(roofline, roofline.get("machine")).split("\n", 2)[2]  # without its title
        lines += ["", "## 6. Roofline (`python -m bench.roofline`, `roofline.md`)", ""]
        lines += [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body.splitlines()]
    path = folder / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_report(folder: Path) -> Path:
    kernels = _load(folder, "kernels.json")
    if kernels:
        plot_kernels(kernel_rows(kernels), folder)
    for name, plot in (("step_compare.json", plot_steps), ("memory.json", plot_memory), ("training.json", plot_training)):
        data = _load(folder, name)
        if data:
            plot(data, folder)
    return write_results_md(folder)


if __name__ == "__main__":
    print(make_report(Path(sys.argv[1])))
