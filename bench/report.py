"""Writing a load report: `<name>.json` (everything), `<name>.md` (tables), `<name>.png` (plots).

The JSON holds the run's facts (date, machine, command line, model, device, settings of every configuration,
workload), one summary per load point, the per-job records, the ratios batched/baseline and, when asked for,
the GCS-latency comparison and the soak. The Markdown and the plot are made from the JSON alone, so
`python -m bench.report bench/results/NAME.json` can redraw them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------ machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import psutil

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("torch", "runpod", "coqui-tts", "transformers"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            pass
    info["packages"] = packages
    return info


def git_info(repo: Path) -> dict[str, Any] | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
        # The code that runs: the packages, new (untracked) files included.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bench/*.py", "server", "batching", "storage"],
                               cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit or None, "uncommitted_changes": bool(dirty)} if commit else None


# --------------------------------------------------------------------------------------------- writing


def write_report(report: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    """Write NAME.json, NAME.md and NAME.png into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(report), encoding="utf-8")
    plot(report, paths["png"])
    return paths


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    m = report.get("machine", {})
    model = report.get("model", {})
    w = report.get("workload", {})
    desc = w.get("offered", {})
    lines = [
        f"# Load benchmark `{report.get('name')}`",
        "",
        f"- **Date**: {report.get('date')}; took {_f(report.get('duration_s'), 0)} s"
        + (" — **INTERRUPTED, partial results**" if report.get("interrupted") else ""),
        f"- **Command**: `{report.get('command')}`",
        f"- **Target**: {report.get('target')}"
        + (f" ({report['endpoint']['base_url']}, endpoint {report['endpoint']['endpoint_id']}, "
           f"{report['endpoint']['mode']}, layout {report['endpoint']['layout']})" if report.get("endpoint") else ""),
        f"- **Machine**: {m.get('cpu_model')}, {m.get('cpu_logical_cores')} logical / "
        f"{m.get('cpu_physical_cores')} physical cores, {m.get('ram_gib')} GiB RAM; load average "
        f"{m.get('load_average_at_start')} at start, {m.get('load_average_at_end')} at end",
        f"- **Model**: {model.get('description')}; **device** {report.get('device')}",
        f"- **Code**: {report.get('git')}",
        f"- **Workload**: {w.get('jobs_per_point')} jobs per point, {w.get('voices')} voices "
        f"(Zipf s={w.get('zipf_s')}),"
        f" text profile `{w.get('profile')}` {w.get('profile_weights')} (max {w.get('max_chars')} chars), "
        f"languages {w.get('languages')}, seed {w.get('seed')}",
        f"- **Offered** (all points, one configuration): {desc.get('jobs')} jobs, {desc.get('chars_total')} chars "
        f"(mean {desc.get('chars_mean')}, median {desc.get('chars_median')}, max {desc.get('chars_max')}), classes "
        f"{desc.get('length_classes')}, languages {desc.get('languages')}, {desc.get('distinct_voices')} distinct "
        f"voices, hottest voice {_pct(desc.get('hottest_voice_share'))} of jobs",
    ]
    if report.get("gcs"):
        lines.append(f"- **GCS**: {report['gcs']}")
    lines += ["", "## Configurations", "", "| run | settings |", "|---|---|"]
    for run in report.get("runs", []):
        settings = ", ".join(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in run.get("settings", {}).items())
        lines.append(f"| {run['run']} | {settings or '(the endpoint as deployed)'} |")

    lines += ["", "## Results", "",
              "Latency is end to end (job queued → result posted); *RP queue*: waiting for a worker to take the "
              "job; *GPU queue*: the worker's `queue_wait`; *synthesis*: `generation_time − queue_wait` "
              "(conditioning and batches). RTF = wall seconds per audio second. Hit rates from the worker's "
              "Prometheus counters.", "",
              "| run | point | jobs | ok | errors | jobs/s | chars/s | audio-s/s | RTF | p50 s | p95 s | p99 s "
              "| RP queue p50 s | GPU queue p50 s | synthesis p50 s | mean batch | latent hits | ref hits "
              "| peak RSS MB |",
              "|---|---|" + "---:|" * 17]  # fmt: skip
    for run in report.get("runs", []):
        for p in run.get("points", []) + ([run["soak"]] if run.get("soak") else []):
            wm = p.get("worker_metrics") or {}
            caches = wm.get("caches", {})
            lat = p["latency_s"]
            lines.append(
                f"| {run['run']} | {p['label']} | {p['jobs']} | {p['completed']} | {p['errors']} | "
                f"{_f(p['jobs_per_s'], 3)} | {_f(p['chars_per_s'], 1)} | {_f(p['audio_s_per_s'], 3)} | "
                f"{_f(p['rtf'], 2)} | {_f(lat['p50'])} | {_f(lat['p95'])} | {_f(lat['p99'])} | "
                f"{_f(p['platform_queue_s']['p50'])} | {_f(p['queue_wait_s']['p50'])} | "
                f"{_f(p['synthesis_s']['p50'])} | {_f((wm.get('batch_size_rows') or {}).get('mean'))} | "
                f"{_pct((caches.get('latents') or {}).get('hit_rate'))} | "
                f"{_pct((caches.get('reference_audio') or {}).get('hit_rate'))} | {_f(p.get('peak_rss_mb'), 0)} |"
            )
    streamed = [(run["run"], p) for run in report.get("runs", []) for p in run.get("points", [])
                if (p.get("first_audio_s") or {}).get("n")]  # fmt: skip
    if streamed:
        lines += ["", "## Time to first audio (streamed runs)", "",
                  "From the job's submission to its first audio: queue mode, the first stream message's arrival at "
                  "the fake RunPod service (or, against an endpoint, the /stream read that brought it); HTTP mode, the "
                  "first byte of the response body at the load generator.", "",
                  "| run | point | jobs | first audio p50 s | p95 s | latency p50 s | p95 s |",
                  "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, p in streamed:
            fa, lat = p["first_audio_s"], p["latency_s"]
            lines.append(f"| {name} | {p['label']} | {fa['n']} | {_f(fa['p50'])} | {_f(fa['p95'])} | "
                         f"{_f(lat['p50'])} | {_f(lat['p95'])} |")
    errors = [(run["run"], p["label"], s) for run in report.get("runs", [])
              for p in run.get("points", []) + ([run["soak"]] if run.get("soak") else [])
              for s in p.get("error_samples", [])]  # fmt: skip
    if errors:
        lines += ["", "Errors (first few per point):", ""]
        lines += [f"- {r} {pt}: {s}" for r, pt, s in errors[:20]]

    for comparison in report.get("ratios", []):
        short = any(r.get("p50_latency_short") is not None for r in comparison["points"])
        first = any(r.get("p50_first_audio") is not None for r in comparison["points"])
        lines += ["", f"## {comparison['numerator']} / {comparison['denominator']}", "",
                  "Throughput ratios above 1 and latency ratios below 1 favour "
                  f"`{comparison['numerator']}`."
                  + (" First audio: the streamed jobs' time to first audio over the other side's latency."
                     if first else ""), "",
                  "| point | audio-s/s | jobs/s | chars/s | p50 latency | p95 latency | p99 latency "
                  + ("| p50 latency, short jobs (<= 60 chars) " if short else "")
                  + ("| p50 first audio / p50 latency | p95 first audio / p95 latency " if first else "")
                  + "| same audio |",
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if short else "") + ("---:|---:|" if first else "")
                  + "---|"]  # fmt: skip
        for r in comparison["points"]:
            lines.append(f"| {r['label']} | {_x(r['audio_s_per_s'])} | {_x(r['jobs_per_s'])} | "
                         f"{_x(r['chars_per_s'])} | {_x(r['p50_latency'])} | {_x(r['p95_latency'])} | "
                         f"{_x(r['p99_latency'])} | " + (f"{_x(r['p50_latency_short'])} | " if short else "")
                         + (f"{_x(r.get('p50_first_audio'))} | {_x(r.get('p95_first_audio'))} | " if first else "")
                         + f"{'yes' if r.get('same_audio') else 'NO'} |")  # fmt: skip

    for comparison in report.get("gcs_latency_comparison", []):
        lines += ["", f"## GCS latency: {comparison['numerator']} / {comparison['denominator']}", "",
                  "Throughput with the added latency on every GCS request, relative to none (1.00x: no loss).", "",
                  "| point | audio-s/s | jobs/s | p50 latency | p95 latency | same audio |",
                  "|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in comparison["points"]:
            lines.append(f"| {r['label']} | {_x(r['audio_s_per_s'])} | {_x(r['jobs_per_s'])} | "
                         f"{_x(r['p50_latency'])} | {_x(r['p95_latency'])} | "
                         f"{'yes' if r.get('same_audio') else 'NO'} |")

    lines += ["", "## Batch sizes (worker's `xtts_batch_size_rows`)", "",
              "| run | point | batches | mean rows | rows per batch (bucket upper bound: count) | job batch sizes |",
              "|---|---|---:|---:|---|---|"]  # fmt: skip
    for run in report.get("runs", []):
        for p in run.get("points", []) + ([run["soak"]] if run.get("soak") else []):
            b = (p.get("worker_metrics") or {}).get("batch_size_rows") or {}
            lines.append(f"| {run['run']} | {p['label']} | {_f(b.get('count'))} | {_f(b.get('mean'))} | "
                         f"{b.get('buckets', '–')} | {p.get('job_batch_sizes')} |")

    soaks = [(run["run"], run["soak"]) for run in report.get("runs", []) if run.get("soak")]
    for name, s in soaks:
        rss = s["rss"]
        lines += ["", f"## Soak ({name})", "",
                  f"{s['jobs']} jobs at concurrency {s['concurrency']}: {s['completed']} ok, {s['errors']} errors, "
                  f"{_f(s['wall_s'], 0)} s, {_f(s['audio_s_per_s'], 3)} audio-s/s. Worker RSS (sampled every "
                  f"{rss['interval_s']} s): **{_f(rss['after_warmup_mb'], 1)} MB** after the first "
                  f"{rss['warmup_jobs']} jobs → **{_f(rss['end_mb'], 1)} MB** at the end: "
                  f"**{_f(rss['growth_mb'], 1, ' MB')}** ({_f(rss['growth_pct'], 2, '%')})."]  # fmt: skip
        if rss.get("first_quarter_mb"):
            lines += ["", "RSS rises and falls with every batch, so single samples depend on where they land. Over "
                      f"the first quarter of the soak after warm-up it ranged {rss['first_quarter_mb'][0]:.0f}–"
                      f"{rss['first_quarter_mb'][1]:.0f} MB, over the last quarter {rss['last_quarter_mb'][0]:.0f}–"
                      f"{rss['last_quarter_mb'][1]:.0f} MB: floor {rss['floor_growth_mb']:+.1f} MB (a leak raises "
                      f"the floor), ceiling {rss['ceiling_growth_mb']:+.1f} MB."]  # fmt: skip

    lines += ["", "## Worker processes", "",
              "| run | start s | RSS after warm-up MB | peak RSS MB | GPU memory | exit |",
              "|---|---:|---:|---:|---|---:|"]
    for run in report.get("runs", []):
        wk = run.get("worker", {})
        gpu = None
        for p in run.get("points", []):
            gpu = (p.get("worker_metrics") or {}).get("gpu_memory_bytes") or gpu
        gpu_text = ", ".join(f"{k} {v / 1024**2:.0f} MB" for k, v in gpu.items()) if gpu else "–"
        lines.append(f"| {run['run']} | {_f(wk.get('start_s'), 1)} | {_f(wk.get('rss_after_warmup_mb'), 0)} | "
                     f"{_f(wk.get('peak_rss_mb'), 0)} | {gpu_text} | {_f(wk.get('exit_status'))} |")

    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plot


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput (audio-s/s) and p95 latency per load point, one bar per run side by side; RSS over time for
    a soak. Bars over the batched run give its ratio to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report.get("runs", [])
    groups = []  # (title, x label, [point labels])
    for mode, title, xlabel in (("closed", "closed loop", "concurrency (clients)"),
                                ("open", "open loop (Poisson)", "offered rate (jobs/s)")):  # fmt: skip
        labels = []
        for run in runs:
            for p in run.get("points", []):
                if p["mode"] == mode and p["label"] not in labels:
                    labels.append(p["label"])
        if labels:
            groups.append((title, xlabel, labels))
    soaks = [run for run in runs if run.get("soak")]
    rows = (len(groups) or (0 if soaks else 1)) + (1 if soaks else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    baseline = next((r for r in runs if r.get("config") == "baseline" and not r.get("gcs_latency_ms")), None)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for row, (title, xlabel, labels) in enumerate(groups):
        ax_t, ax_l = axes[row]
        width = 0.8 / max(1, len(runs))
        for i, run in enumerate(runs):
            by_label = {p["label"]: p for p in run.get("points", [])}
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(labels))]
            thr = [(by_label.get(lb) or {}).get("audio_s_per_s") or 0 for lb in labels]
            p95 = [((by_label.get(lb) or {}).get("latency_s") or {}).get("p95") or 0 for lb in labels]
            color = colors[i % len(colors)]
            bars = ax_t.bar(xs, thr, width, label=run["run"], color=color)
            ax_l.bar(xs, p95, width, label=run["run"], color=color)
            if baseline is not None and run is not baseline:
                base = {p["label"]: p for p in baseline.get("points", [])}
                for bar, lb, value in zip(bars, labels, thr, strict=True):
                    b = (base.get(lb) or {}).get("audio_s_per_s")
                    if b and value:
                        ax_t.annotate(f"{value / b:.1f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                      ha="center", va="bottom", fontsize=8)  # fmt: skip
        ticks = [lb.split("@", 1)[1].lstrip("c") for lb in labels]
        for ax, ylabel in ((ax_t, "throughput (audio-seconds / s)"), (ax_l, "p95 end-to-end latency (s)")):
            ax.set_xticks(range(len(labels)), ticks)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {'throughput' if ax is ax_t else 'p95 latency'}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    if not groups and not soaks:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no load points", ha="center", va="center")
    if soaks:
        ax_rss, ax_info = axes[rows - 1]
        for run in soaks:
            series = run["soak"]["rss"]["series_s_mb"]
            if series:
                line = ax_rss.plot([t for t, _ in series], [m for _, m in series], label=run["run"])[0]
                warm_at = run["soak"]["rss"].get("warmup_at_s")
                if warm_at is not None:
                    ax_rss.axvline(warm_at, color=line.get_color(), linestyle=":", linewidth=1)
        ax_rss.set_xlabel("soak time (s); dotted: end of the soak's warm-up jobs")
        ax_rss.set_ylabel("worker RSS (MB)")
        ax_rss.set_title("soak: worker RSS")
        ax_rss.grid(alpha=0.3)
        ax_rss.legend(fontsize=8)
        ax_info.axis("off")
        text = "\n".join(
            f"{run['run']}: {run['soak']['rss']['after_warmup_mb']} MB after warm-up -> "
            f"{run['soak']['rss']['end_mb']} MB at end ({run['soak']['rss']['growth_mb']} MB, "
            f"{run['soak']['rss']['growth_pct']}%)" for run in soaks)  # fmt: skip
        ax_info.text(0.0, 0.5, text, va="center", fontsize=9, wrap=True)
    model = report.get("model", {}).get("description", "")
    fig.suptitle(f"{report.get('name')}: {model} on {report.get('device')}, {report.get('date')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Redraw NAME.md and NAME.png from NAME.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report bench/results/NAME.json", file=sys.stderr)
        return 2
    source = Path(args[0])
    report = json.loads(source.read_text(encoding="utf-8"))
    source.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    plot(report, source.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
