"""Tables (plain and Markdown), goal lines and PNG plots for a bench/serve.py run (its JSON)."""

from __future__ import annotations

from pathlib import Path

GOAL_MANY_TASKS = 0.90  # classify throughput at the most tasks, over the single-task reference
GOAL_VS_NAIVE = 10.0  # taskdelta over the merged-copy route at the same number of tasks
GOAL_COLD = 2.0  # cold first answer over a warm one

COLUMNS = [  # header, key, format
    ("scenario", "label", "{}"), ("T", "tasks", "{:,}"), ("C", "clients", "{}"),
    ("req/s", "throughput", "{:.1f}"), ("x ref", "ratio", "{:.2f}"), ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"), ("swaps/s", "swaps_per_s", "{:.1f}"),
    ("swap ms", "swap_ms", "{:.1f}"), ("batch", "mean_batch", "{:.2f}"),
    ("hit %", "hit_pct", "{:.1f}"), ("miss/1k req", "misses_per_1k", "{:.1f}"),
    ("RSS MB", "rss_mb", "{:.0f}"), ("state MB", "state_mb", "{:.0f}"),
    ("mixed %", "mixed_pct", "{:.0f}"), ("tasks/mixed", "tasks_per_mixed", "{:.1f}"),
]
TOKENS = ("tok/s", "tokens_per_s", "{:.1f}")  # generate only


def _cells(row: dict, ref: float | None) -> dict:
    r = dict(row)
    r["ratio"] = row["throughput"] / ref if ref else float("nan")
    r["swap_ms"] = row.get("swap_ms_mean", row.get("load_ms_mean", float("nan")))
    r["hit_pct"] = 100 * row.get("cache_hit_rate", float("nan"))
    r["rss_mb"] = row.get("rss", 0) / 1e6
    if "mixed_share" in row:
        r["mixed_pct"] = 100 * row["mixed_share"]
    state = row.get("state_bytes")
    if state is None:
        state = row.get("base_state_bytes", 0) + row.get("cache_bytes", 0)
    r["state_mb"] = state / 1e6
    return r


def _reference(rows: list[dict], clients: int) -> float | None:
    """The mean of the reference windows (run first and last: the machine drifts) at `clients`."""
    refs = [r["throughput"] for r in rows if r.get("reference") and r["clients"] == clients]
    return sum(refs) / len(refs) if refs else None


def table(rows: list[dict], markdown: bool) -> str:
    cells = [_cells(r, _reference(rows, r["clients"])) for r in rows]
    columns = COLUMNS[:4] + [TOKENS] + COLUMNS[4:] if "tokens_per_s" in rows[0] else COLUMNS
    texts = [[fmt.format(c[key]) if key in c else "" for _, key, fmt in columns] for c in cells]
    heads = [h for h, _, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(
            " --- " if i == 0 else " ---: " for i in range(len(heads))) + "|"]
        lines += ["| " + " | ".join(t) + " |" for t in texts]
        return "\n".join(lines)
    widths = [max(len(h), *(len(t[i]) for t in texts)) for i, h in enumerate(heads)]
    fmt_row = lambda t: "  ".join(x.ljust(w) if i == 0 else x.rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(t, widths, strict=True)))
    return "\n".join([fmt_row(heads), *(fmt_row(t) for t in texts)])


def goals(out: dict) -> list[str]:
    lines = []
    rows = [r for r in out.get("classify", []) if r.get("kind") == "taskdelta"]
    for clients in sorted({r["clients"] for r in rows}):
        ref = _reference(rows, clients)
        ours = [r for r in rows if not r.get("reference") and r["clients"] == clients]
        if ref and ours:
            most = max(ours, key=lambda r: r["tasks"])
            ratio = most["throughput"] / ref
            lines.append(f"classify, C={clients}, {most['tasks']:,} tasks / 1 task: {ratio:.2f} (goal "
                         f">= {GOAL_MANY_TASKS:.2f}: {'met' if ratio >= GOAL_MANY_TASKS else 'NOT met'})")
    mixed = [r for r in out.get("classify", []) if r.get("kind") == "mixed"]
    for clients in sorted({r["clients"] for r in mixed}):
        ref = _reference(rows, clients)
        ours = [r for r in mixed if r["clients"] == clients]
        if ref and ours:
            most = max(ours, key=lambda r: r["tasks"])
            ratio = most["throughput"] / ref
            exact = [r for r in rows if r["tasks"] == most["tasks"] and r["clients"] == clients
                     and not r.get("reference")]
            vs = f"; {most['throughput'] / exact[0]['throughput']:.2f}x the exact mode" if exact else ""
            lines.append(f"classify with mixed batches, C={clients}, {most['tasks']:,} tasks / 1 task: "
                         f"{ratio:.2f} (goal >= {GOAL_MANY_TASKS:.2f}: "
                         f"{'met' if ratio >= GOAL_MANY_TASKS else 'NOT met'}{vs})")
    naive = [r for r in out.get("classify", []) if r.get("kind") == "naive"]
    for n in naive:
        ours = [r for r in rows if r["tasks"] == n["tasks"] and r["clients"] == n["clients"]
                and not r.get("reference")]
        if ours:
            ratio = ours[0]["throughput"] / n["throughput"]
            lines.append(f"classify, C={n['clients']}, {n['tasks']} tasks, taskdelta / naive merged "
                         f"copies ({n.get('mode')}, LRU {n.get('lru')}): {ratio:.1f}x (goal >= "
                         f"{GOAL_VS_NAIVE:.0f}x: "
                         f"{'met' if ratio >= GOAL_VS_NAIVE else 'NOT met'})")
    gen = out.get("generate", [])
    for r in gen:
        gref = _reference(gen, r["clients"])
        if gref and not r.get("reference"):
            lines.append(f"generate, {r['tasks']} tasks / base only: {r['throughput'] / gref:.2f} "
                         "(no goal set)")
    for encoding, cold in out.get("cold", {}).items():
        lines.append(f"cold start ({encoding} upload, {cold['blob_bytes'] / 1e6:.2f} MB): "
                     f"{cold['cold_ms']:.1f} ms vs warm {cold['warm_ms']:.1f} ms = {cold['ratio']:.2f}x "
                     f"(goal <= {GOAL_COLD:.0f}x: {'met' if cold['ratio'] <= GOAL_COLD else 'NOT met'}); "
                     f"vs a warm request that needs a swap ({cold['warm_swap_ms']:.1f} ms): "
                     f"{cold['ratio_vs_warm_swap']:.2f}x")
    return lines


def sections(out: dict) -> dict[str, str]:
    """Markdown pieces for docs/performance.md: machine, classify, naive, generate, cold, goals."""
    m = out["machine"]
    loads = [x for r in out.get("classify", []) + out.get("generate", []) for x in r["loadavg_1min"]]
    loads += [c["loadavg_1min"] for c in out.get("cold", {}).values()]
    parts = {"machine": (
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, torch {m['torch']} (CPU), Python "
        f"{m['python']}; each server process uses {m['server_torch_threads']} torch thread. Load "
        f"average (1 min) {m['loadavg_start'][0]} at the start, {min(loads, default=0):.1f} to "
        f"{max(loads, default=0):.1f} during the windows, {m.get('loadavg_end', ['?'])[0]} at the "
        f"end. Run started {out['started']}, {out.get('seconds', 0) / 60:.0f} min in all.")}
    rows = out.get("classify", [])
    ours = [r for r in rows if r.get("kind") != "naive"]
    if ours:
        parts["classify"] = table(ours, markdown=True)
    naive = [r for r in rows if r.get("kind") == "naive"]
    if naive:
        same = [r for r in ours if r.get("kind") == "taskdelta" and not r.get("reference")
                and (r["tasks"], r["clients"]) in {(n["tasks"], n["clients"]) for n in naive}]
        refs = [r for r in ours if r.get("reference") and r["clients"] in {n["clients"] for n in naive}]
        parts["naive"] = table(refs + same + naive, markdown=True)
    if out.get("generate"):
        parts["generate"] = table(out["generate"], markdown=True)
    colds = out.get("cold", {})
    if colds:
        head = "| | " + " | ".join(f"{k} upload" for k in colds) + " |\n| --- |" + " ---: |" * len(colds)
        lines = [("blob MB", lambda c: f"{c['blob_bytes'] / 1e6:.2f}"),
                 ("cold: first answer, ms (median)", lambda c: f"{c['cold_ms']:.1f}"),
                 ("warm: the same request again, ms", lambda c: f"{c['warm_ms']:.1f}"),
                 ("warm, another cached task (a swap), ms", lambda c: f"{c['warm_swap_ms']:.1f}"),
                 ("**cold / warm**", lambda c: f"**{c['ratio']:.2f}**"),
                 ("cold / warm with a swap", lambda c: f"{c['ratio_vs_warm_swap']:.2f}")]
        steps = list(next(iter(colds.values()))["breakdown_ms"])
        lines += [(f"in-process: {k}, ms", lambda c, k=k: f"{c['breakdown_ms'][k]:.1f}") for k in steps]
        parts["cold"] = head + "\n" + "\n".join(
            f"| {name} | " + " | ".join(f(c) for c in colds.values()) + " |" for name, f in lines)
    parts["goals"] = "\n".join(f"- {g}" for g in goals(out))
    return parts


def markdown(out: dict) -> str:
    """The tables and goal lines as Markdown, for docs/performance.md."""
    return "\n\n".join(f"**{k}**\n\n{v}" for k, v in sections(out).items()) + "\n"


def report(out: dict, plots: Path | None, md: Path | None = None) -> None:
    m = out["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, server threads "
          f"{m['server_torch_threads']}, load average {m['loadavg_start']} -> {m.get('loadavg_end')}")
    if out.get("classify_cache_bytes"):
        print(f"classify servers' delta cache: {out['classify_cache_bytes'] / 2**30:.2f} GiB "
              "(every task of the largest T)")
    for key, title in (("classify", "classify on minilm"), ("generate", "generate on smollm2-135m")):
        if out.get(key):
            print(f"\n{title}\n" + table(out[key], markdown=False))
    for encoding, cold in out.get("cold", {}).items():
        print(f"\ncold path ({encoding}), in-process breakdown (median ms): " + ", ".join(
            f"{k} {v:.1f}" for k, v in cold["breakdown_ms"].items()))
    print("\ngoals:\n" + "\n".join("  " + g for g in goals(out)))
    if md is not None:
        md.write_text(markdown(out))
        print(f"markdown: {md}")
    if plots is not None:
        written = plot(out, plots)
        print("plots: " + ", ".join(str(p) for p in written))


def plot(out: dict, folder: Path) -> list[Path]:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter  # noqa: PLC0415

    def plain(axis) -> None:  # 1-2-5 ticks written as plain numbers on a log axis
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(StrMethodFormatter("{x:g}"))
        axis.set_minor_formatter(NullFormatter())

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    kinds = [(k, t) for k, t in (("classify", "classify, minilm"), ("generate", "generate, smollm2-135m"))
             if out.get(k)]
    if not kinds:
        return written
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 6.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], kinds, strict=True):
        _throughput_panel(ax, out[key], title)
        plain(ax.xaxis)
        plain(ax.yaxis)
    fig.tight_layout()
    written.append(folder / "perf-throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    panels = [(key, title, c) for key, title in kinds for c in sorted({r["clients"] for r in out[key]})]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 4.6), squeeze=False)
    for ax, (key, title, clients) in zip(axes[0], panels, strict=True):
        for r in out[key]:
            lat = sorted(r["latencies_ms"]) if r["clients"] == clients else []
            if lat:
                ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=r["label"],
                        linestyle="--" if r.get("kind") != "taskdelta" else "-")
        ax.set_xscale("log")
        plain(ax.xaxis)
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"latency CDF: {title}, C={clients}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written.append(folder / "perf-latency-cdf.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def _throughput_panel(ax, rows: list[dict], title: str) -> None:
    all_clients = sorted({r["clients"] for r in rows})
    for n, clients in enumerate(all_clients):
        ref = _reference(rows, clients)
        tag = f", C={clients}" if len(all_clients) > 1 else ""
        ours = sorted((r for r in rows if r.get("kind") == "taskdelta" and not r.get("reference")
                       and r["clients"] == clients), key=lambda r: r["tasks"])
        if ref:
            ax.axhline(ref, color=f"C{n}", linestyle="--", alpha=0.7,
                       label=f"reference: 1 task / base only{tag}")
            ax.axhline(GOAL_MANY_TASKS * ref, color=f"C{n}", linestyle=":", alpha=0.7,
                       label=f"0.90 x reference{tag}")
        ax.plot([r["tasks"] for r in ours], [r["throughput"] for r in ours], "o-", color=f"C{n}",
                label=f"taskdelta{tag}")
        mixed = sorted((r for r in rows if r.get("kind") == "mixed" and r["clients"] == clients),
                       key=lambda r: r["tasks"])
        if mixed:
            ax.plot([r["tasks"] for r in mixed], [r["throughput"] for r in mixed], "^-.",
                    color=f"C{n}", alpha=0.8, label=f"taskdelta, mixed batches{tag}")
        for r in ours + mixed:
            ax.annotate(f"{r['throughput'] / ref:.2f}x" if ref else "", (r["tasks"], r["throughput"]),
                        textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        for m, mode in enumerate(sorted({r.get("mode") for r in rows if r.get("kind") == "naive"})):
            naive = [r for r in rows if r.get("mode") == mode and r["clients"] == clients]
            if naive:
                ax.plot([r["tasks"] for r in naive], [r["throughput"] for r in naive], "sv"[m % 2],
                        color=f"C{3 + m}", label=f"naive {mode}: merged copy per task, "
                        f"LRU {naive[0].get('lru')}{tag}")
        embed = [r for r in rows if r.get("kind") == "embed" and r["clients"] == clients]
        if embed:
            ax.axhline(embed[0]["throughput"], color="C2", linestyle="-.", alpha=0.6,
                       label=f"base embed route, same text{tag}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tasks (Zipf 1.0 popularity)")
    ax.set_ylabel("requests / s")
    ax.set_title(f"throughput: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
