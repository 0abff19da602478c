"""Per-trial table of the logs written by run_cpu_step_trials.sh: each command's median step time (its JSON
line) and the ratio of the best opdkit configuration to the fastest TRL configuration of the same trial.

    python docs/experiments/issue15/summarize_trials.py LOG_DIR
"""

import glob
import json
import re
import statistics
import sys

OPDKIT = ["opd_mixed", "opd_mixed_static", "opd_mixed_static_eager_fused"]
TRL = ["trl_dist", "trl_dist_bf16", "trl_gkd", "trl_gkd_bf16", "trl_gkd_bf16_eager"]


def step_median(path: str) -> float | None:
    try:
        lines = [line for line in open(path) if line.startswith("{")]
    except FileNotFoundError:
        return None
    return json.loads(lines[-1])["step_time_s_median"] if lines else None


def main(log_dir: str) -> None:
    trials = sorted({int(m.group(1)) for f in glob.glob(f"{log_dir}/*.log") if (m := re.search(r"_(\d+)\.log$", f))})
    print("| trial | " + " | ".join(OPDKIT + TRL) + " | best opdkit / fastest TRL | new opdkit / fastest TRL |")
    print("|--:|" + "--:|" * (len(OPDKIT) + len(TRL) + 2))
    ratios = []
    for t in trials:
        v = {n: step_median(f"{log_dir}/{n}_{t}.log") for n in OPDKIT + TRL}
        trl = min(x for n in TRL if (x := v[n]))
        best = min(x for n in OPDKIT if (x := v[n]))
        new = v["opd_mixed_static_eager_fused"]
        ratios.append(best / trl)
        cells = [f"{v[n]:.3f}" if v[n] else "-" for n in OPDKIT + TRL]
        print(f"| {t} | " + " | ".join(cells) + f" | {best / trl:.3f} | " + (f"{new / trl:.3f} |" if new else "- |"))
    print(f"\nbest opdkit / fastest TRL over {len(ratios)} trials: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
