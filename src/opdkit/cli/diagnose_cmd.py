"""``opdkit diagnose --student S --teacher T[,T2 ...] --data FILE_OR_BENCH --n-rollouts N``.

Gradient-alignment diagnostics (docs/methods.md §6; arXiv 2605.10889): targeted rollouts give the ideal
per-token gradient ``g*``; each method's logit direction is compared with it by cosine, split by
correct / incorrect rollouts, per question and per teacher. Defaults diagnose the shipped CPU miniature.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("diagnose", help="ideal per-token gradients from targeted rollouts; alignment per method",
                       description="Sample student rollouts, probe nodes at depths 1, 2, 4, 8, ... (candidates = "
                                   "sampled token ∪ student top-k ∪ teacher top-k, each completed M times by the "
                                   "student and verified), and score every method's logit direction against the "
                                   "ideal gradient g*. Writes nodes.jsonl, rollouts.jsonl, aggregates.json, "
                                   "summary.json, report.md, alignment_hist.png, alignment_depth.png and "
                                   "rollouts.html to --out.")
    p.add_argument("--student", default="miniature", help="student model path / hub id, or 'miniature' (shipped)")
    p.add_argument("--teacher", default="miniature",
                   help="teachers, comma-separated: a model path / hub id ('miniature' = the shipped teacher), "
                        "self:CONTEXT (the student itself under a privileged context: solution, answer, hint or a "
                        "template with {problem} {answer} {solution} {hint}; opdkit extension) or MODEL:PRESET, "
                        "e.g. miniature,self:solution,self:answer,self:hint")
    p.add_argument("--hint-lines", type=int, default=2, help="lines of the solution a context's {hint} holds")
    p.add_argument("--data", default="chain12@7",
                   help="benchmark name (chain8, chain12, math500, ...), chainK for any K or chainK@SEED for another "
                        "data seed (the miniature's task with K steps; default: chain12 problems of dev seed 7, no "
                        "benchmark's, of which the shipped student solves about 30 %% at T = 1), or a .jsonl "
                        "path; comma-separated for several")
    p.add_argument("--data-dir", default="", help="directory of registered benchmark files")
    p.add_argument("--n-rollouts", type=int, default=64, help="student rollouts to diagnose")
    p.add_argument("--samples-per-question", type=int, default=1, help="rollouts per question")
    p.add_argument("--offset", type=int, default=0, help="skip the first questions of the data")
    p.add_argument("--grader", default="auto", help="chain, math, or auto (chain when the data are chain problems)")
    p.add_argument("--m", type=int, default=8, help="completions per candidate (M)")
    p.add_argument("--k", type=int, default=3, help="student / teacher top-k added to the candidates")
    p.add_argument("--lsm-k", type=int, default=3,
                   help="LSM support size: the teacher's top-K inside each node's candidate set (labelled in the "
                        "report). Not training's loss.topk, the teacher's top-K over the full vocabulary (32 in "
                        "the paper configs): the support cannot exceed the candidates (at most 1 + 2k), so the "
                        "default 3 (= --k) is a small-support stand-in")
    p.add_argument("--jsd-beta", default="", help="extra generalized-JSD β values, comma-separated (0.5 is built in)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="response cap (0: 256 for chain data, 1024 otherwise)")
    p.add_argument("--temperature", type=float, default=1.0, help="training temperature (rollouts and completions)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--budget-tokens", type=int, default=60_000, help="completion-token budget per rollout")
    p.add_argument("--max-nodes", type=int, default=16, help="nodes per rollout at most")
    p.add_argument("--no-minillm", action="store_true", help="skip the teacher scoring of completions (MiniLLM's "
                                                             "future term is then 0)")
    p.add_argument("--template", default=None, help="prompt template with {problem} (default: chain '{problem}\\n', "
                                                     "else the Qwen math prompt)")
    p.add_argument("--chat-template", choices=("auto", "on", "off"), default="auto",
                   help="wrap prompts in the chat template (auto: off for chain data, on otherwise)")
    p.add_argument("--run", default="", help="training run directory: drift-gate settings from its config.yaml and "
                                             "its final/ model as the current policy")
    p.add_argument("--metrics", default="", help="a run's metrics.jsonl (same as --run with its directory)")
    p.add_argument("--gate-model", default="", help="current-policy model for the drift-gate view (overrides --run)")
    p.add_argument("--gate", default="block", help="gate segmenter when no run config says: token, block, newline, "
                                                   "sequence")
    p.add_argument("--gate-block-size", type=int, default=16, help="block size of the 'block' gate")
    p.add_argument("--gate-tau", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the main process (0: torch's "
                                                          "default; small models run best single-threaded)")
    p.add_argument("--workers", type=int, default=2, help="processes probing rollouts in parallel, one thread each "
                                                          "(results do not depend on it; 1 = in this process)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="diagnose_out", help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")


def settings_from_args(args):
    from opdkit.diagnose.gating import GateSpec
    from opdkit.diagnose.nodes import ProbeParams
    from opdkit.diagnose.runner import DiagnoseSettings
    from opdkit.gates.registry import SegmentParams
    from opdkit.runtime.prompts import PromptSettings

    chain = all(d.strip().startswith("chain") for d in args.data.split(","))
    max_new = args.max_new_tokens or (256 if chain else 1024)
    for name, v, lo in (("--m", args.m, 1), ("--k", args.k, 1), ("--max-nodes", args.max_nodes, 1),
                        ("--budget-tokens", args.budget_tokens, 1)):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
    run_dir = args.run or (str(Path(args.metrics).parent) if args.metrics else "")
    newline = ()
    if args.gate == "newline":
        from opdkit.diagnose.runner import resolve_model_path
        from opdkit.rollout.preflight import newline_token_ids
        from opdkit.runtime.models import load_tokenizer

        newline = tuple(newline_token_ids(load_tokenizer(resolve_model_path(args.student, "student"))))
    gate = GateSpec(args.gate, args.gate_tau, SegmentParams(block_size=args.gate_block_size,
                                                            newline_token_ids=newline))
    probe = ProbeParams(k=args.k, m=args.m, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=max_new, budget_tokens=args.budget_tokens, max_nodes=args.max_nodes,
                        minillm=not args.no_minillm)
    betas = tuple(float(b) for b in args.jsd_beta.split(",") if b.strip())
    return DiagnoseSettings(
        student=args.student, teachers=[t.strip() for t in args.teacher.split(",") if t.strip()], data=args.data,
        n_rollouts=args.n_rollouts, samples_per_question=args.samples_per_question, offset=args.offset,
        grader=args.grader, probe=probe, lsm_k=args.lsm_k, hint_lines=args.hint_lines, jsd_betas=betas,
        seed=args.seed, out=args.out,
        prompt=PromptSettings(args.template, args.chat_template), data_dir=args.data_dir, device=args.device,
        dtype=args.dtype, run_dir=run_dir, gate_model=args.gate_model, gate=gate,
        trust_remote_code=args.trust_remote_code, progress=not args.no_progress, workers=args.workers,
        command=("opdkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
                 if sys.argv[1:2] == ["diagnose"] else "")).validate()


def run(args) -> int:
    import torch

    from opdkit.diagnose.runner import diagnose

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        s = settings_from_args(args)
    except ValueError as e:
        print(f"opdkit diagnose: {e}", file=sys.stderr)
        return 2
    summary = diagnose(s)
    out = Path(args.out)
    sys.stdout.write((out / "report.md").read_text())
    print(f"\nwrote {out}/nodes.jsonl, rollouts.jsonl, aggregates.json, summary.json, report.md, "
          f"{', '.join(summary.get('plots', []))}, rollouts.html ({summary['wall_seconds']:.1f} s)")
    return 0
