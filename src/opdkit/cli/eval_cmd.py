"""``opdkit eval --model PATH_OR_ID --benchmarks aime24,aime25,math500,amc23 --n 8 --k 1,8``."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="sample n responses per problem, verify, report avg@n and pass@k",
                       description="Evaluate a model on math benchmarks (unbiased pass@k, §7). Writes "
                                   "results.json, results.md, results.csv and samples.jsonl to --out.")
    p.add_argument("--model", required=True, help="save_pretrained directory or hub id")
    p.add_argument("--tokenizer", default="", help="tokenizer path or id (default: the model's)")
    p.add_argument("--benchmarks", default="aime24,aime25,math500,amc23",
                   help="comma-separated registered names (aime24, aime25, math500, amc23, chain8, ...) "
                        "or .jsonl paths")
    p.add_argument("--data-dir", default="", help="directory of the registered benchmark files "
                                                  "(default: $OPDKIT_DATA_DIR or ../shared/data)")
    p.add_argument("--n", type=int, default=8, help="samples per problem")
    p.add_argument("--k", default="1,8", help="comma-separated k of pass@k (each <= n)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per response at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--limit", type=int, default=0, help="first N problems of each benchmark (0 = all)")
    p.add_argument("--prompts-per-batch", type=int, default=8, help="problems sampled together")
    p.add_argument("--grader", default="math", help="math (math-verify) or chain (the CPU miniature)")
    p.add_argument("--template", default=None, help="prompt template with {problem} (default: the training "
                                                     "default, Qwen math prompt; chain benchmarks: the task's)")
    p.add_argument("--no-chat-template", action="store_true", help="do not wrap prompts in the chat template")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="display name in reports")
    p.add_argument("--out", default="eval_out", help="output directory")
    p.add_argument("--trust-remote-code", action="store_true")


def load_benchmarks(spec: str, data_dir: str = "", limit: int = 0) -> dict:
    """``"aime24,chain8,path.jsonl"`` -> {name: problems}; chain names come from the miniature task."""
    from opdkit.eval.benchmarks import Problem, load_benchmark

    out = {}
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name.startswith("chain") and not name.endswith(".jsonl"):
            from opdkit.tasks.chain import BENCHMARK_KS, make_benchmark

            if name not in BENCHMARK_KS:
                raise ValueError(f"unknown chain benchmark {name!r}; valid: {', '.join(BENCHMARK_KS)}")
            rows = make_benchmark(BENCHMARK_KS[name])
            probs = [Problem(id=r["id"], problem=r["problem"], answer=r["answer"], source=r.get("source", ""),
                             extra={}) for r in rows]
        else:
            probs = load_benchmark(name, data_dir=data_dir or None)
        out[Path(name).stem if name.endswith(".jsonl") else name] = probs[:limit] if limit else probs
    return out


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
    import torch

    from opdkit.config import QWEN_MATH_TEMPLATE
    from opdkit.eval.runner import evaluate, write_results
    from opdkit.models import load_model, load_tokenizer

    ks = parse_ks(args.k, args.n)
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--prompts-per-batch", args.prompts_per_batch)):
        if value < 1:
            raise ValueError(f"{flag} {value} must be at least 1")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit} must be >= 0 (0 = every problem)")
    from opdkit.models import require_model_sources

    require_model_sources([("--model", args.model), ("--tokenizer", args.tokenizer)])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    benches = load_benchmarks(args.benchmarks, args.data_dir, args.limit)
    template = args.template
    if template is None:
        template = "{problem}\n" if args.grader == "chain" else QWEN_MATH_TEMPLATE
    tok = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code).eval()
    res = evaluate(model, tok, benches, n=args.n, ks=ks, temperature=args.temperature, top_p=args.top_p,
                   max_new_tokens=args.max_new_tokens, template=template,
                   chat_template=not args.no_chat_template, prompts_per_batch=args.prompts_per_batch,
                   seed=args.seed, grader=args.grader, out_dir=args.out, label=args.label, model_name=args.model)
    write_results(res, Path(args.out))
    sys.stdout.write((Path(args.out) / "results.md").read_text())
    print(f"wrote {args.out}/results.json, results.md, results.csv, samples.jsonl ({res['wall_s']:.1f} s)")
    return 0
