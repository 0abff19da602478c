"""``opdkit eval --model PATH_OR_ID --benchmarks aime24,aime25,math500,amc23 --n 8 --k 1,8``."""

from __future__ import annotations

import sys
from pathlib import Path

from opdkit.runtime.graders import GRADERS
from opdkit.runtime.models import DTYPE_CHOICES
from opdkit.runtime.prompts import CHAT_TEMPLATE_CHOICES


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="sample n responses per problem, verify, report avg@n and pass@k",
                       description="Evaluate a model on math benchmarks (unbiased pass@k, docs/methods.md §7). Writes "
                                   "results.json, results.md, results.csv and samples.jsonl to --out.")
    p.add_argument("--model", required=True, help="save_pretrained directory or hub id")
    p.add_argument("--tokenizer", default="", help="tokenizer path or id (default: the model's)")
    p.add_argument("--benchmarks", default="aime24,aime25,math500,amc23",
                   help="comma-separated names: aime24, aime25, math500, amc23 (files in the data directory), "
                        "chainK for any K in 1..26 (the CPU miniature; chainK@SEED: from data seed SEED, "
                        "problems the demo never evaluates), or .jsonl paths")
    p.add_argument("--data-dir", default="", help="directory of the math benchmark files (default: "
                                                  "$OPDKIT_DATA_DIR; they are not shipped)")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--k", default="1,8", help="comma-separated k of pass@k (each <= n)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark (0 = all)")
    p.add_argument("--prompts-per-batch", type=int, default=8, help="problems sampled together")
    p.add_argument("--grader", default="auto", choices=(*GRADERS, "auto"),
                   help="math (math-verify), chain (the CPU miniature), auto (chain for chain problems)")
    p.add_argument("--template", default=None, help="prompt template with {problem} (default: the Qwen math "
                                                     "prompt; chain benchmarks: the task's plain '{problem}\\n')")
    p.add_argument("--chat-template", default="auto", choices=CHAT_TEMPLATE_CHOICES,
                   help="wrap prompts in the chat template (auto: off for chain problems, else on)")
    p.add_argument("--no-chat-template", action="store_true", help="same as --chat-template off")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="display name in reports")
    p.add_argument("--out", default="eval_out", help="output directory")
    p.add_argument("--trust-remote-code", action="store_true")


def parse_ks(spec: str, n: int) -> tuple[int, ...]:
    """``--k 1,8`` with ``--n 8`` -> (1, 8); one actionable line for anything else."""
    if n < 1:
        raise ValueError(f"--n {n}: the number of samples per problem must be at least 1 (e.g. --n 8)")
    try:
        ks = tuple(int(k) for k in spec.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"--k {spec!r} must be comma-separated whole numbers, e.g. --k 1,8") from None
    if not ks:
        raise ValueError("--k is empty; give the k of pass@k, e.g. --k 1,8")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"--k {spec}: pass@k needs 1 <= k <= --n (= {n}); {bad} is out of range: "
                         f"raise --n to {max(bad)} or drop those k")
    return ks


def run(args) -> int:
    from opdkit.eval.runner import evaluate
    from opdkit.rollout.sampler import SamplingParams
    from opdkit.runtime.benchmarks import load_problem_sets
    from opdkit.runtime.prompts import PromptSettings
    from opdkit.runtime.settings import ModelSettings

    ks = parse_ks(args.k, args.n)
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--prompts-per-batch", args.prompts_per_batch)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit} must be >= 0 (0 = every problem)")
    model_settings = ModelSettings(args.model, args.tokenizer, args.dtype, args.device or "auto",
                                   args.trust_remote_code).validate(flags=True)
    benches = load_problem_sets(args.benchmarks, args.data_dir, args.limit)
    prompt = PromptSettings(args.template, "off" if args.no_chat_template else args.chat_template).validate()
    model, tok = model_settings.load()
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    res = evaluate(model, tok, benches, n=args.n, ks=ks, sampling=sampling, prompt=prompt, grader=args.grader,
                   prompts_per_batch=args.prompts_per_batch, seed=args.seed, out_dir=args.out, label=args.label,
                   model_name=args.model)
    sys.stdout.write((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, results.csv, samples.jsonl ({res['wall_s']:.1f} s)")
    return 0
