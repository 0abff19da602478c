import json, sys, glob, os
for d in sorted(glob.glob("/work/wt-cd/runs/dev/*/eval/results.json")):
    r = json.load(open(d)); b = r["benchmarks"]
    p1 = [b[k]["pass@1"] * 100 for k in b]; p8 = [b[k]["pass@8"] * 100 for k in b]
    print(f"{r['label']:24s} pass@1 " + " ".join(f"{x:5.1f}" for x in p1) + f" | mean {sum(p1)/4:5.1f}   pass@8 " +
          " ".join(f"{x:5.1f}" for x in p8) + f" | mean {sum(p8)/4:5.1f}")
