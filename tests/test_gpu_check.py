"""benchmarks/gpu_check.py (the prepared device check) runs end to end on CPU with tiny shapes."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*argv):
    """(the script's module, its result) for ``--tiny --device cpu`` and ``argv``."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, mod.run(mod.parse_args(["--tiny", "--device", "cpu", *argv]))


def test_gpu_check_tiny_cpu(capsys):
    mod, res = _run("--steps", "2", "--prompts", "2", "--samples", "2", "--prompt-tokens", "5",
                    "--prompt-tokens-step", "3", "--new-tokens", "6", "--microbatch-size", "2")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))  # the JSON line is the result
    assert len(res["steps"]) == 2 and res["rows"] == 4
    assert all(r["generated_tokens"] == 4 * 6 for r in res["steps"])  # EOS suppressed: exactly 6 tokens
    assert [r["prompt_tokens"] for r in res["steps"]] == [5, 8]  # a new prompt length (attention shape) per step
    for key in ("sample_tokens_per_s", "sample_s", "teacher_s", "update_s", "pass0_drift_max"):
        assert res[key] >= 0
    assert res["pass0_drift_max"] < 1e-3  # float32 on CPU: sampler and update agree to rounding
    assert {"torch.float32": True} in res["lean_step_checks"]  # the lean step passed its check
    # the paper-like shapes are the real Qwen3 ones (parameter counts of Qwen3-1.7B / 4B, tied embeddings)
    assert mod.STUDENT.hidden_size == 2048 and mod.STUDENT.num_layers == 28 and mod.TEACHER.num_layers == 36


def test_gpu_check_with_eos_ids_ends_rows_apart(capsys):
    """--eos-ids K: rows end at varied points (so the sampler drops finished rows); the report says so."""
    _, res = _run("--steps", "2", "--prompts", "4", "--samples", "2", "--prompt-tokens", "5", "--new-tokens", "40",
                  "--eos-ids", "25", "--microbatch-size", "4")
    assert res["eos_ids"] == 25
    assert any(0 < r["stop_eos"] < 1 for r in res["steps"])  # some rows ended early, others ran on
    assert all(r["generated_tokens"] < 8 * 40 for r in res["steps"])
