"""scratch_dev_summary.py DIR: pass@1 / pass@8 (%) per dev benchmark and their mean, one line per run in DIR."""
import glob
import json
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/dev"
for path in sorted(glob.glob(f"{root}/*/eval/results.json")):
    r = json.load(open(path))
    b = r["benchmarks"]
    p1 = [b[k]["pass@1"] * 100 for k in b]
    p8 = [b[k]["pass@8"] * 100 for k in b]
    print(f"{r['label']:24s} pass@1 " + " ".join(f"{x:5.1f}" for x in p1) + f" | mean {sum(p1) / len(p1):5.1f}"
          f"   pass@8 " + " ".join(f"{x:5.1f}" for x in p8) + f" | mean {sum(p8) / len(p8):5.1f}")
