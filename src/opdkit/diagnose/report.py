"""Aggregates, Markdown report, histogram / depth plots and the colourized token page (docs/methods.md §6).

Input: ``summary`` (settings, counts, timings) and the rollout records of
:func:`opdkit.diagnose.runner.diagnose` (or ``rollouts.jsonl`` read back). Spread: node cosines of one
rollout are correlated, so the headline unit is the *rollout*: a rollout's score is the mean cosine of
its scored nodes, and the table reports mean ± standard error over rollouts (``n`` rollouts, ``k``
nodes). Node-pooled means and the rollout-level concatenated cosine (:func:`concat_cosine`, which a
gate changes) are reported too.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

SPLITS = ("correct", "incorrect", "all")


def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "se": None}
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return {"n": n, "mean": round(mean, 6), "se": round(se, 6) if se is not None else None}


def _in_split(r: dict, split: str) -> bool:
    return split == "all" or (split == "correct") == bool(r["correct"])


def _nodes(r: dict, teacher: str) -> list[tuple[int, dict]]:
    t = r["teachers"].get(teacher, {})
    return sorted(((int(k), v) for k, v in t.get("node_alignment", {}).items()), key=lambda kv: kv[0])


def aggregate(summary: dict, rollouts: list[dict]) -> dict:
    """Per teacher: per split x method stats, per question, per depth; see the module docstring."""
    methods, out = summary["methods"], {}
    for teacher in summary["teachers"]:
        by_split = {}
        for split in SPLITS:
            rs = [r for r in rollouts if _in_split(r, split)]
            ms = {}
            for m in methods:
                per_rollout, pooled, wsum, wcos = [], [], 0.0, 0.0
                for r in rs:
                    vals = []
                    for pos, al in _nodes(r, teacher):
                        v = al.get(m)
                        if v is None:
                            continue
                        vals.append(v)
                        if r.get("gates"):
                            w = r["gates"][pos]
                            wsum, wcos = wsum + w, wcos + w * v
                    pooled += vals
                    if vals:
                        per_rollout.append(sum(vals) / len(vals))
                t = {r_["rollout"]: r_["teachers"].get(teacher, {}) for r_ in rs}
                ms[m] = {"rollout": _stats(per_rollout), "node": _stats(pooled),
                         "concat": _stats([x.get("concat", {}).get(m) for x in t.values()]),
                         "concat_gated": _stats([x.get("concat_gated", {}).get(m) for x in t.values()]),
                         "node_gate_weighted": round(wcos / wsum, 6) if wsum > 0 else None}
            n_nodes = sum(r["teachers"].get(teacher, {}).get("nodes", 0) for r in rs)
            n_scored = sum(r["teachers"].get(teacher, {}).get("scored", 0) for r in rs)
            by_split[split] = {"rollouts": len(rs), "nodes": n_nodes, "skipped_gstar_zero": n_nodes - n_scored,
                               "methods": ms}
        per_q: dict = {}
        for r in rollouts:
            q = per_q.setdefault(r["question"], {"rollouts": 0, "correct": 0, "_v": {m: [] for m in methods}})
            q["rollouts"] += 1
            q["correct"] += int(bool(r["correct"]))
            for _, al in _nodes(r, teacher):
                for m in methods:
                    q["_v"][m].append(al.get(m))
        for q in per_q.values():
            q["methods"] = {m: _stats(v) for m, v in q.pop("_v").items()}
        by_depth: dict = {}
        for r in rollouts:
            for pos, al in _nodes(r, teacher):
                d = by_depth.setdefault(pos + 1, {s: {m: [] for m in methods} for s in SPLITS})
                for s in SPLITS:
                    if _in_split(r, s):
                        for m in methods:
                            d[s][m].append(al.get(m))
        by_depth = {k: {s: {m: _stats(v) for m, v in d[s].items()} for s in SPLITS}
                    for k, d in sorted(by_depth.items())}
        out[teacher] = {"by_split": by_split, "per_question": per_q, "by_depth": by_depth}
    return out


def _fmt(st: dict, unit: str = "") -> str:
    if not st["n"]:
        return "n/a (0)"
    se = f" ± {st['se']:.3f}" if st["se"] is not None else ""
    return f"{st['mean']:+.3f}{se} ({st['n']}{unit})"


def _diff(a: dict, b: dict) -> str:
    if not a["n"] or not b["n"]:
        return "n/a"
    d = b["mean"] - a["mean"]
    if a["se"] is None or b["se"] is None:
        return f"{d:+.3f}"
    return f"{d:+.3f} ± {math.hypot(a['se'], b['se']):.3f}"


def _table(agg_t: dict, methods: list[str], key: str, unit: str, labels: dict | None = None) -> list[str]:
    bs = agg_t["by_split"]
    lines = ["| method | correct | incorrect | incorrect − correct | all |", "|---|---|---|---|---|"]
    for m in methods:
        c, i, a = (bs[s]["methods"][m][key] for s in SPLITS)
        lines.append(f"| {(labels or {}).get(m, m)} | {_fmt(c, unit)} | {_fmt(i, unit)} | {_diff(c, i)} | "
                     f"{_fmt(a, unit)} |")
    return lines


def _lsm_k(summary: dict) -> int | None:
    """The diagnostic LSM support size (``--lsm-k``) a run used; None when its summary does not say."""
    return (summary.get("settings") or {}).get("lsm_k")


def _context_label(summary: dict, teacher: str) -> str:
    ctx = summary.get("contexts", {}).get(teacher)
    return "student's prompt" if not ctx else "`" + ctx.replace("\n", "\\n") + "`"


def context_table(summary: dict, agg: dict) -> list[str]:
    """Teachers (a model plus a context) side by side: alignment per token (pooled nodes), per rollout and per
    question, on correct and incorrect rollouts (opdkit extension, :mod:`opdkit.diagnose.contexts`)."""
    from opdkit.diagnose.contexts import compare

    rows = compare(agg, summary["methods"])
    if len(agg) < 2 or not rows:
        return []
    L = ["## Teachers and contexts compared", "",
         "Mean alignment ± standard error. Per token: pooled nodes; per rollout: mean of a rollout's nodes; per "
         "question: mean over questions of their pooled nodes. A context is the teacher's prompt (the "
         "student always sees its own).", "",
         "| teacher | context | method | per token, correct | per token, incorrect | per rollout, correct | "
         "per rollout, incorrect | incorrect − correct (rollout) | per question |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (tc, ti), (rc, ri) = ((r[u]["correct"], r[u]["incorrect"]) for u in ("token", "rollout"))
        q = "n/a" if r["question_mean"] is None else f"{r['question_mean']:+.3f} ({r['questions']})"
        L.append(f"| {html.escape(r['teacher'])} | {_context_label(summary, r['teacher'])} | {r['method']} | "
                 f"{_fmt(tc)} | {_fmt(ti)} | {_fmt(rc)} | {_fmt(ri)} | {_diff(rc, ri)} | {q} |")
    return L + [""]


def markdown(summary: dict, agg: dict) -> str:
    s, methods = summary, summary["methods"]
    L = ["# opdkit diagnose: gradient alignment with the ideal per-token gradient (docs/methods.md §6)", ""]
    if s.get("command"):
        L += ["```", s["command"], "```", ""]
    L += [f"- rollouts: {s['rollouts']} ({s['correct']} correct, {s['rollouts'] - s['correct']} incorrect); "
          f"grader `{s['grader']}`; teachers: {', '.join(s['teachers'])}",
          f"- nodes (x teachers): {s['nodes']}, of which {s['skipped_gstar_zero']} skipped because g* = 0 "
          "(every candidate had the same Psucc)",
          f"- targeted completions: {s['completions']} ({s['completion_tokens']} tokens) in "
          f"{s['sample_seconds']:.1f} s of sampling: **{s['completions_per_s']:.1f} completions/s**, "
          f"{s['completion_tokens_per_s']:.0f} tokens/s",
          f"- wall time: {s['wall_seconds']:.1f} s (rollouts {s['rollout_seconds']:.1f} s, probing "
          f"{s['probe_seconds']:.1f} s) on {s['device']} with {s['threads']} thread(s)", ""]
    if s.get("gate"):
        g = s["gate"]
        L += [f"- drift gate: `{g['name']}` (τ = {g['tau']}, block {g['block_size']}), current policy "
              f"`{g['model']}` vs the diagnosed student as behaviour policy; settings from {g['source']}", ""]
    k_lsm = _lsm_k(s)
    labels = {"lsm": f"lsm (K = {k_lsm})"} if k_lsm is not None else {}
    if k_lsm is not None and "lsm" in methods:
        L += [f"- `lsm` support: the teacher's top-{k_lsm} inside each node's candidate set (`--lsm-k {k_lsm}`), "
              "not training's `loss.topk` K, which is the teacher's top-K over the full vocabulary", ""]
    L += ["Cells: mean ± standard error (count). Alignment = cosine(g*, method direction) on the node's "
          "candidate set; `*_sampled` rows use the rollout's own token (a single-sample signal), the "
          "others the expected direction. `drgrpo` uses the same Psucc as g*, so it is 1 by construction (a "
          "sanity check of the pipeline; with exact Psucc Dr.GRPO's expected gradient is g*).", ""]
    L += context_table(summary, agg)
    for teacher, a in agg.items():
        L += [f"## Teacher `{teacher}`", "",
              "### Per rollout (mean of its node cosines; count = rollouts)", ""]
        L += _table(a, methods, "rollout", "", labels) + [""]
        L += ["### Pooled nodes (count = nodes; nodes of a rollout are correlated)", ""]
        L += _table(a, methods, "node", "", labels) + [""]
        L += ["### Rollout direction (cosine of the concatenated node vectors; count = rollouts)", ""]
        L += _table(a, methods, "concat", "", labels) + [""]
        if s.get("gate"):
            L += ["### Gated rollout direction (each node's direction scaled by its drift-gate weight)", ""]
            L += _table(a, methods, "concat_gated", "", labels) + [""]
            L += ["Gate-weighted node mean (Σ w·cos / Σ w), all rollouts: " + ", ".join(
                f"{m} {a['by_split']['all']['methods'][m]['node_gate_weighted']}" for m in methods), ""]
        pq = a["per_question"]
        if len(pq) <= 40:
            m0 = methods[0]
            L += [f"### Per question ({m0}, pooled nodes)", "", "| question | rollouts | correct | alignment |",
                  "|---|---|---|---|"]
            L += [f"| {html.escape(q)} | {v['rollouts']} | {v['correct']} | {_fmt(v['methods'][m0])} |"
                  for q, v in pq.items()] + [""]
    L += ["Files: `nodes.jsonl` (every node), `rollouts.jsonl`, `aggregates.json`, `summary.json`, "
          "`alignment_hist.png`, `alignment_depth.png`, `rollouts.html`.", ""]
    return "\n".join(L)


def plots(out: Path, summary: dict, agg: dict, rollouts: list[dict]) -> list[str]:
    """Histogram of node cosines per method (correct vs incorrect) and mean cosine by depth, per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, files = summary["methods"], []
    for ti, teacher in enumerate(summary["teachers"]):
        suffix = "" if ti == 0 else f"_{ti + 1}"
        cols = 4
        rows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, m in zip(axes.flat, methods):
            for split, color in (("correct", "tab:green"), ("incorrect", "tab:red")):
                xs = [al[m] for r in rollouts if _in_split(r, split) for _, al in _nodes(r, teacher)
                      if al.get(m) is not None]
                if xs:
                    ax.hist(xs, bins=20, range=(-1, 1), density=True, alpha=0.5, color=color,
                            label=f"{split} ({len(xs)})")
            ax.set_title(m, fontsize=9)
            ax.tick_params(labelsize=7)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        fig.suptitle(f"cosine(g*, direction) per node, teacher {teacher}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / f"alignment_hist{suffix}.png", dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(12.5, 3.6), sharey=True)
        depths = list(agg[teacher]["by_depth"])
        for ax, split in zip(axes, ("correct", "incorrect")):
            for m in methods:
                ys = [agg[teacher]["by_depth"][d][split][m]["mean"] for d in depths]
                ax.plot(depths, [y if y is not None else float("nan") for y in ys], marker="o", ms=3, label=m)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{split} rollouts", fontsize=10)
            ax.set_xlabel("depth (response position, 1-based)")
            ax.axhline(0, color="gray", lw=0.5)
        axes[0].set_ylabel("mean cosine")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"alignment_depth{suffix}.png", dpi=110)
        plt.close(fig)
        files += [f"alignment_hist{suffix}.png", f"alignment_depth{suffix}.png"]
    return files


def _align_color(v: float | None) -> str:
    if v is None:
        return "#dddddd"
    a = min(abs(v), 1.0) * 0.85 + 0.1
    return f"rgba(0,160,0,{a:.2f})" if v >= 0 else f"rgba(220,0,0,{a:.2f})"


def _gate_color(w: float) -> str:
    if w < 1.0:
        return f"rgba(255,140,0,{min(1.0 - w, 1.0) * 0.9 + 0.05:.2f})"
    return f"rgba(60,120,255,{min(w - 1.0, 1.0) * 0.9 + 0.05:.2f})"


_JS = """
function col(v){if(v===null||v===undefined)return '#dddddd';const a=Math.min(Math.abs(v),1)*0.85+0.1;
return v>=0?`rgba(0,160,0,${a.toFixed(2)})`:`rgba(220,0,0,${a.toFixed(2)})`;}
function paint(){const t=document.getElementById('tsel').value,m=document.getElementById('msel').value;
document.querySelectorAll('span.node').forEach(s=>{const a=JSON.parse(s.dataset.al)[t]||{};const v=a[m];
s.style.background=col(v);
s.title=(s.dataset.info||'')+'\\n'+m+' cos = '+(v===null||v===undefined?'skipped':v.toFixed(3));});}
"""


def _html_context_table(summary: dict, agg: dict | None) -> str:
    from opdkit.diagnose.contexts import compare

    if not agg or len(agg) < 2:
        return ""
    esc = html.escape
    head = ("<table border='1' cellpadding='3' style='border-collapse:collapse'><tr><th>teacher</th><th>context</th>"
            "<th>method</th><th>per token, correct</th><th>per token, incorrect</th><th>per rollout, correct</th>"
            "<th>per rollout, incorrect</th></tr>")
    ctx = summary.get("contexts", {})
    cells = [(u, sp) for u in ("token", "rollout") for sp in ("correct", "incorrect")]
    body = "".join(f"<tr><td>{esc(r['teacher'])}</td><td><code>{esc(ctx.get(r['teacher']) or '(student prompt)')}"
                   f"</code></td><td>{esc(r['method'])}</td>"
                   + "".join(f"<td>{esc(_fmt(r[u][sp]))}</td>" for u, sp in cells)
                   + "</tr>" for r in compare(agg, summary["methods"]))
    return "<h2>Teachers and contexts compared</h2>" + head + body + "</table>"


def html_page(summary: dict, rollouts: list[dict], agg: dict | None = None) -> str:
    """Rollouts with probed tokens coloured by alignment (green +, red −, grey g* = 0) and every token by gate."""
    esc = html.escape
    methods, teachers = summary["methods"], summary["teachers"]
    t0, m0 = teachers[0], methods[0]
    opts_t = "".join(f"<option>{esc(t)}</option>" for t in teachers)
    opts_m = "".join(f"<option>{esc(m)}</option>" for m in methods)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>opdkit diagnose</title><style>",
             "body{font-family:sans-serif;margin:1.5em;max-width:1100px}.tok{font-family:monospace;"
             "white-space:pre-wrap;line-height:1.7}.node{outline:1px solid #333;cursor:help}"
             ".roll{border-top:1px solid #aaa;margin-top:1em;padding-top:.5em}.bad{color:#b00}.ok{color:#070}",
             "</style><script>", _JS, "</script></head><body onload='paint()'>",
             "<h1>opdkit diagnose: alignment per probed token</h1>",
             "<p>Boxed tokens are probed nodes, coloured by cosine(g*, direction): green positive, red negative, "
             "grey skipped (g* = 0). Hover for candidates (text, p, q, Psucc). Other tokens were not probed.",
             " A second line, when a drift gate was given, colours every token by its normalized gate weight "
             "(orange &lt; 1, blue &gt; 1).</p>",
             f"<p>teacher <select id='tsel' onchange='paint()'>{opts_t}</select> method "
             f"<select id='msel' onchange='paint()'>{opts_m}</select></p>", _html_context_table(summary, agg)]
    for r in rollouts:
        cls = "ok" if r["correct"] else "bad"
        parts.append(f"<div class='roll'><b>rollout {r['rollout']}</b> · question {esc(str(r['question']))} · "
                     f"<span class='{cls}'>{'correct' if r['correct'] else 'incorrect'}</span> · stop "
                     f"{esc(str(r['stop']))}<br><span class='tok'>{esc(r['problem'])}</span><div class='tok'>")
        al = {t: {int(k): v for k, v in r["teachers"].get(t, {}).get("node_alignment", {}).items()} for t in teachers}
        cands = {int(k): v for k, v in r["teachers"].get(t0, {}).get("node_cands", {}).items()}
        for pos, text in enumerate(r["tokens"]):
            if any(pos in al[t] for t in teachers):
                data = {t: al[t].get(pos, {}) for t in teachers}
                info = f"depth {pos + 1}; candidates ({t0}): " + "; ".join(
                    f"{c!r} p={p} q={q} Psucc={ps}" for c, p, q, ps in cands.get(pos, []))
                if len(teachers) > 1:  # this token under every teacher / context
                    info += f"; {m0} by teacher: " + ", ".join(
                        f"{t} {data[t][m0]:+.3f}" if data[t].get(m0) is not None else f"{t} skipped" for t in teachers)
                if r.get("gates"):
                    info += f"; gate {r['gates'][pos]:.3f}"
                v = data[t0].get(m0)
                parts.append(f"<span class='node' style='background:{_align_color(v)}' "
                             f"data-al='{esc(json.dumps(data), quote=True)}' data-info='{esc(info, quote=True)}' "
                             f"title='{esc(info, quote=True)}'>{esc(text)}</span>")
            else:
                parts.append(f"<span>{esc(text)}</span>")
        parts.append("</div>")
        if r.get("gates"):
            parts.append("<div class='tok'>")
            parts += [f"<span style='background:{_gate_color(w)}' title='gate {w:.3f}'>{esc(text)}</span>"
                      for text, w in zip(r["tokens"], r["gates"])]
            parts.append("</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(out: Path, summary: dict, rollouts: list[dict]) -> dict:
    """Write ``aggregates.json``, ``report.md``, the plots and ``rollouts.html``; returns the aggregates."""
    out = Path(out)
    agg = aggregate(summary, rollouts)
    (out / "aggregates.json").write_text(json.dumps(agg, indent=1))
    summary["plots"] = plots(out, summary, agg, rollouts)
    (out / "report.md").write_text(markdown(summary, agg))
    (out / "rollouts.html").write_text(html_page(summary, rollouts, agg), encoding="utf-8")
    return agg
