"""Why LSM's direction is often anti-aligned with g* (README, "Diagnose"): for the nodes of an
``opdkit diagnose`` run, split by LSM alignment, how often the student is sharper than the teacher on the
teacher's top-k support (renormalized top probability p̂_max > q̂_max), and how often the candidate with the
highest Psucc is the student's own top token.

    python benchmarks/lsm_sharpness.py runs/diagnose/nodes.jsonl
"""

from __future__ import annotations

import json
import sys


def main(path: str, threshold: float = 0.3) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if not r["skipped"] and r["alignment"].get("lsm") is not None]

    def sharper(r) -> bool:
        S = [i for i, s in enumerate(r["lsm_support"]) if s]
        ps, qs = [r["p"][i] for i in S], [r["q"][i] for i in S]
        return max(ps) / sum(ps) > max(qs) / sum(qs)

    def best_is_student_top(r) -> bool:
        j = max(range(len(r["psucc"])), key=lambda i: r["psucc"][i])
        return r["p"][j] == max(r["p"])

    for name, keep in ((f"lsm cosine < -{threshold}", lambda a: a < -threshold),
                       (f"lsm cosine > +{threshold}", lambda a: a > threshold)):
        xs = [r for r in rows if keep(r["alignment"]["lsm"])]
        if not xs:
            print(f"{name}: no nodes")
            continue
        print(f"{name}: {len(xs)} nodes; student sharper than teacher on the LSM support: "
              f"{sum(map(sharper, xs)) / len(xs):.0%}; best-Psucc candidate is the student's top token: "
              f"{sum(map(best_is_student_top, xs)) / len(xs):.0%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/diagnose/nodes.jsonl")
