"""Timeline plot of replay runs (matplotlib, the `bench` extra): per trace and policy, which
model held the resource (a bar per model; hatched while it was being brought up) and the
queue lengths over time."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.replay import Run

COLORS = {"a": "tab:blue", "b": "tab:orange", "c": "tab:green"}


def plot(runs: Sequence[Run], path: str) -> None:
    """One panel per (mode, trace), one column per policy, written to `path` (PNG)."""
    rows = sorted({(r.mode, r.trace) for r in runs}, key=lambda k: (k[0], k[1]))
    cols = sorted({r.policy for r in runs})
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(6.5 * len(cols), 2.4 * len(rows)),
                             squeeze=False, sharex="row")
    for run in runs:
        ax = axes[rows.index((run.mode, run.trace))][cols.index(run.policy)]
        names = sorted({n for _, _, q in run.samples for n in q} | {t for *_, t in
                                                                    run.switches})
        lane = {n: i for i, n in enumerate(names)}
        # who held the resource: from the samples (held), switches hatched on top
        for name in names:
            spans, start = [], None
            for t, held, _ in run.samples:
                if name in held and start is None:
                    start = t
                elif name not in held and start is not None:
                    spans.append((start, t - start))
                    start = None
            if start is not None and run.samples:
                spans.append((start, run.samples[-1][0] - start))
            ax.broken_barh(spans, (lane[name] - 0.4, 0.8), color=COLORS.get(name, "grey"),
                           alpha=0.35)
        for s, e, target in run.switches:
            ax.broken_barh([(s, e - s)], (lane.get(target, 0) - 0.4, 0.8), facecolor="none",
                           edgecolor="black", hatch="//", linewidth=0.5)
        ax.set_yticks(range(len(names)), [f"{n} held" for n in names], fontsize=7)
        ax.set_ylim(-0.6, len(names) - 0.4)
        q = ax.twinx()
        times = [t for t, _, _ in run.samples]
        for name in names:
            q.step(times, [qs.get(name, 0) for _, _, qs in run.samples], where="post",
                   color=COLORS.get(name, "grey"), linewidth=1, label=f"{name} queue")
        q.set_ylabel("queued", fontsize=7)
        q.tick_params(labelsize=7)
        ax.tick_params(labelsize=7)
        ends = [float(r["end"]) for r in run.requests if r["end"] is not None]  # type: ignore[arg-type]
        ax.set_xlim(0, (max(ends) if ends else 1.0) + 2)
        ax.set_title(f"{run.mode}: {run.trace} / {run.policy}", fontsize=9)
        if rows.index((run.mode, run.trace)) == len(rows) - 1:
            ax.set_xlabel("seconds", fontsize=8)
        q.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
