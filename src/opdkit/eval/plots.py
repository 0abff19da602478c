"""PNG plots for ``opdkit report``: grouped bars, pass@k curves, training curves.

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas (no pyplot, no display,
no global backend change). Each function returns the written path (None when there is nothing to plot).
"""

from __future__ import annotations

import math
from pathlib import Path

from opdkit.eval.passk import mean_pass_at_k
from opdkit.eval.runs import RunRecord, finite_number, group_by_seed, group_label, problem_counts, read_metrics
from opdkit.eval.tables import PASS_RE, all_benchmarks, mean_std, run_values

DPI = 120
Series = tuple[str, str, list[RunRecord]]  # (legend label, color, member runs)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def _groups(runs: list[RunRecord], group_seeds: bool) -> list[tuple[str, list[RunRecord]]]:
    return group_by_seed(runs) if group_seeds else [(r.label, [r]) for r in runs]


def make_series(runs: list[RunRecord], group_seeds: bool = False,
                palette_runs: list[RunRecord] | None = None) -> list[Series]:
    """One series per run, or per seed group (same color for a group's runs). Colors are assigned over
    ``palette_runs`` (default ``runs``) so one run keeps its color across figures that show subsets."""
    keys = [k for k, _ in _groups(palette_runs or runs, group_seeds)]
    groups = _groups(runs, group_seeds)
    keys += [k for k, _ in groups if k not in keys]
    colors = dict(zip(keys, _colors(len(keys)), strict=True))
    return [(group_label(k, m), colors[k], m) for k, m in groups]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _legend(fig, axes, handles_labels=None) -> None:
    hs, ls = handles_labels or axes[0].get_legend_handles_labels()
    if not hs:
        return
    ncol = min(len(ls), 4)
    fig.legend(hs, ls, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)


# ----------------------------------------------------------------------------------------------- bars


def bars_png(runs: list[RunRecord], metric: str, path: str | Path, group_seeds: bool = False,
             palette_runs: list[RunRecord] | None = None) -> Path:
    """Grouped bars: one group per benchmark (+ mean), one bar per run (seed groups: mean with ±std bars)."""
    import numpy as np

    series = make_series(runs, group_seeds, palette_runs)
    cols = [*all_benchmarks(runs), "mean"]
    vals = {id(r): run_values(r, metric) for r in runs}
    n_s = len(series)
    width = 0.8 / max(n_s, 1)
    fig = _figure(max(6.0, 1.0 + len(cols) * (0.35 + 0.22 * n_s)), 4.6)
    ax = fig.add_subplot()
    x = np.arange(len(cols))
    top = 0.0
    label_bars = n_s * len(cols) <= 32
    for i, (label, color, members) in enumerate(series):
        means, errs = [], []
        for c in cols:
            m, s, _ = mean_std([vals[id(r)].get(c) for r in members])
            means.append(np.nan if m is None else 100.0 * m)
            errs.append(0.0 if s is None else 100.0 * s)
        means_a, errs_a = np.array(means), np.array(errs)
        pos = x - 0.4 + width * (i + 0.5)
        yerr = errs_a if len(members) > 1 else None
        bars = ax.bar(pos, np.nan_to_num(means_a), width * 0.92, color=color, label=label, yerr=yerr,
                      capsize=2 if yerr is not None else 0, error_kw={"elinewidth": 0.8})
        if label_bars:
            ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.1f}" for v in means_a], fontsize=7,
                         padding=1)
        if np.isfinite(means_a).any():
            top = max(top, float(np.nanmax(means_a + errs_a)))
    ax.set_xticks(x, cols, rotation=20 if len(cols) > 6 else 0)
    ax.axvline(len(cols) - 1.5, color="0.7", lw=0.8, ls=":")
    ax.set_ylim(0, min(100.0, top * 1.15 + 2) if top > 0 else 100.0)
    if not any(np.isfinite(v) for v in [100.0 * x if x is not None else np.nan
                                         for d in vals.values() for x in d.values()]):
        ax.text(0.5, 0.5, f"no {metric} values (not evaluated, or n too small)", transform=ax.transAxes,
                ha="center", va="center", color="0.4")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_xlabel("benchmark")
    ax.set_title(f"{metric} per benchmark" + (" (mean ± std over seeds)" if group_seeds else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend(fig, [ax])
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- pass@k


def passk_curve(bench: dict, ks: list[int] | None = None) -> dict[int, float]:
    """``{k: pass@k}`` of one benchmark: from per-problem counts for k = 1..min n (or the given ks ≤ n);
    without counts, the stored ``pass@K`` values."""
    counts = problem_counts(bench)
    if counts:
        try:
            n_min = int(min(float(n) for n in counts[0]))
            kk = [k for k in (ks or range(1, n_min + 1)) if 1 <= k <= n_min]
            return {k: mean_pass_at_k(counts[0], counts[1], k) for k in kk}
        except (ValueError, TypeError):
            pass
    out = {}
    for key, v in bench.items():
        m = PASS_RE.match(key)
        if m and finite_number(v) is not None and (ks is None or int(m[1]) in ks):
            out[int(m[1])] = float(v)
    return dict(sorted(out.items()))


def run_passk_curves(run: RunRecord, ks: list[int] | None = None) -> dict[str, dict[int, float]]:
    """Per-benchmark curves plus ``"mean"`` (unweighted over the run's benchmarks, at k all of them have)."""
    curves = {b: passk_curve(run.results["benchmarks"][b], ks) for b in run.benchmarks}
    if curves:
        common = set.intersection(*(set(c) for c in curves.values()))
        curves["mean"] = {k: sum(c[k] for c in curves.values()) / len(curves) for k in sorted(common)}
    return curves


def _log2_axis(ax, kmax: int) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ticks = [2 ** i for i in range(int(math.log2(max(kmax, 1))) + 1)]
    if kmax not in ticks:
        ticks.append(kmax)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlim(0.85, kmax * 1.15 if kmax > 1 else 1.5)


def passk_png(runs: list[RunRecord], path: str | Path, ks: list[int] | None = None,
              group_seeds: bool = False, palette_runs: list[RunRecord] | None = None) -> Path | None:
    """pass@k over k (log2 axis), one subplot per benchmark + mean, one line per run
    (seed groups: mean ± std band)."""
    import numpy as np

    series = make_series(runs, group_seeds, palette_runs)
    curves = {id(r): run_passk_curves(r, ks) for r in runs}
    panels = [*all_benchmarks(runs), "mean"]
    if not any(curves[id(r)].get(p) for r in runs for p in panels):
        return None
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(4.2 * ncols, 3.3 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        kmax = 1
        for label, color, members in series:
            cs = [curves[id(r)].get(panel) or {} for r in members]
            kk = sorted(set.intersection(*(set(c) for c in cs)) if cs else set())
            if not kk:
                continue
            y = np.array([[100.0 * c[k] for k in kk] for c in cs])
            mean = y.mean(axis=0)
            marker = "o" if len(kk) <= 16 else None
            ax.plot(kk, mean, color=color, label=label, marker=marker, ms=3, lw=1.6)
            if len(cs) > 1:
                std = y.std(axis=0, ddof=1)
                ax.fill_between(kk, mean - std, mean + std, color=color, alpha=0.18, lw=0)
            kmax = max(kmax, kk[-1])
        _log2_axis(ax, kmax)
        ax.set_title("mean over benchmarks" if panel == "mean" else panel)
        ax.set_xlabel("k (samples)")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3, which="major")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for ax in axes[:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    _legend(fig, axes, (list(handles.values()), list(handles)))
    fig.suptitle("pass@k (unbiased estimator)" + (" — mean ± std over seeds" if group_seeds else ""))
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- training


_PANELS = [  # (key, title, y label)
    ("loss", "loss", "loss"),
    ("sampled_rkl", "teacher–student KL (sampled tokens)", "KL (nats/token)"),
    ("drift_abs_mean", "drift |Δ| mean", "|drift|"),
    ("gate", "gate range (min–max)", "gate value"),
    ("solve_rate", "solve rate", "fraction solved"),
    ("response_len", "response length", "tokens"),
]


def training_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{key: (steps, values)}`` over rollout steps: from ``step`` records; a key found only in
    ``update`` records is averaged over the updates of each step."""
    recs = read_metrics(path)
    steps = [r for r in recs if r.get("kind") == "step" and finite_number(r.get("step")) is not None]
    updates = [r for r in recs if r.get("kind") == "update" and finite_number(r.get("step")) is not None]
    keys = ["loss", "sampled_rkl", "drift_abs_mean", "gate_min", "gate_max", "solve_rate", "response_len"]
    out: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        for source, avg in ((steps, False), (updates, True)):
            acc: dict[float, list[float]] = {}
            for r in source:
                v = finite_number(r.get(key))
                if v is not None:
                    acc.setdefault(float(r["step"]), []).append(v)
            if acc:
                xs = sorted(acc)
                out[key] = (xs, [sum(acc[x]) / len(acc[x]) if avg else acc[x][-1] for x in xs])
                break
    return out


def training_png(runs: list[RunRecord], path: str | Path, group_seeds: bool = False,
                 palette_runs: list[RunRecord] | None = None) -> Path | None:
    """Subplots over rollout step (loss, sampled KL, drift, gate band, solve rate, response length when
    logged), one line per run (seed groups share a color)."""
    import numpy as np

    data = {id(r): training_series(r.metrics_path) for r in runs if r.metrics_path is not None}
    series = make_series([r for r in runs if id(r) in data], group_seeds, palette_runs or runs)
    if not series:
        return None
    present = []
    for key, title, ylab in _PANELS:
        need = ("gate_min", "gate_max") if key == "gate" else (key,)
        if any(all(k in d for k in need) for d in data.values()):
            present.append((key, title, ylab))
    if not present:
        return None
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(4.2 * ncols, 3.2 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, object] = {}
    band_alpha = max(0.06, 0.25 / sum(len(m) for _, _, m in series))
    for ax, (key, title, ylab) in zip(axes, present, strict=False):
        for label, color, members in series:
            for j, r in enumerate(members):
                d = data[id(r)]
                lab = label if j == 0 else None
                if key == "gate":
                    if "gate_min" not in d or "gate_max" not in d:
                        continue
                    lo, hi = dict(zip(*d["gate_min"], strict=True)), dict(zip(*d["gate_max"], strict=True))
                    xs = sorted(set(lo) & set(hi))
                    if not xs:
                        continue
                    ylo, yhi = np.array([lo[x] for x in xs]), np.array([hi[x] for x in xs])
                    ax.fill_between(xs, ylo, yhi, color=color, alpha=band_alpha, lw=0)
                    h = ax.plot(xs, ylo, color=color, lw=1.0, label=lab)[0]
                    ax.plot(xs, yhi, color=color, lw=1.0, ls="--")
                elif key in d:
                    xs, ys = d[key]
                    h = ax.plot(xs, ys, color=color, lw=1.4, label=lab, marker="o" if len(xs) <= 20 else None,
                                ms=3)[0]
                else:
                    continue
                if lab is not None:
                    handles.setdefault(lab, h)
        ax.set_title(title)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    for ax in axes[len(present):]:
        ax.set_visible(False)
    _legend(fig, axes, (list(handles.values()), list(handles)))
    fig.suptitle("training" + (" (gate: solid = min, dashed = max)" if any(p[0] == "gate" for p in present)
                               else ""))
    return _save(fig, path)


__all__ = ["bars_png", "passk_png", "training_png", "passk_curve", "run_passk_curves", "training_series",
           "make_series"]
