"""The shared runtime layer: device / dtype / EOS resolution, prompts, problem sets, graders, decoding."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opdkit.runtime.benchmarks import chain_k, chain_spec, is_chain, load_benchmark, load_problem_sets
from opdkit.runtime.graders import GRADERS, REWARD_CHOICES, as_reward_fn, get_grader, resolve_grader, reward_fn
from opdkit.runtime.models import auto_dtype, eos_token_ids, resolve_device
from opdkit.runtime.prompts import CHAIN_TEMPLATE, QWEN_MATH_TEMPLATE, PromptSettings, chat_setting, format_prompt
from opdkit.tokenizer import char_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "opdkit"


def _tok_and_model(gen_eos):
    tok = SimpleNamespace(eos_token_id=2)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=gen_eos))
    return tok, model


@pytest.mark.parametrize(("gen_eos", "want"), [(None, [2]), (5, [2, 5]), ([7, 2, 5], [2, 5, 7]), (2, [2])])
def test_eos_ids_union_of_tokenizer_and_generation_config(gen_eos, want):
    tok, model = _tok_and_model(gen_eos)
    assert eos_token_ids(model, tok) == want


def test_auto_device_and_dtype():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto") == resolve_device("") == resolve_device(None)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_dtype("auto", cpu) == "float32"
    assert auto_dtype("auto", cuda) == "bfloat16"  # a frozen model on a GPU
    assert auto_dtype("auto", cuda, trains=True) == "float32"  # master weights stay float32
    assert auto_dtype("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ValueError, match="valid"):
        auto_dtype("fp8", cpu)


def test_prompt_settings_one_chat_setting():
    assert PromptSettings().resolve(chain=True) == (CHAIN_TEMPLATE, False)
    assert PromptSettings().resolve(chain=False) == (QWEN_MATH_TEMPLATE, True)
    assert PromptSettings("Q: {problem}", "on").resolve(chain=True) == ("Q: {problem}", True)
    assert PromptSettings(None, "off").resolve(chain=False) == (QWEN_MATH_TEMPLATE, False)
    assert chat_setting(True) == "on" and chat_setting(False) == "off"
    with pytest.raises(ValueError, match="auto, on, off"):
        PromptSettings(None, "yes").validate()
    with pytest.raises(ValueError, match="must contain"):
        PromptSettings("no placeholder").resolve(chain=False)


def test_format_prompt_chat_and_plain():
    tok = char_tokenizer()
    plain = format_prompt(tok, "1+1", template="{problem}\n", chat_template=False)
    assert tok.decode(plain) == "1+1\n"
    chat = tok.decode(format_prompt(tok, "1+1", template="{problem}", chat_template=True))
    assert chat == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"


def test_chain_sets_for_any_k_through_one_loader():
    sets = load_problem_sets("chain3,chain8", limit=5)
    assert list(sets) == ["chain3", "chain8"] and all(len(v) == 5 for v in sets.values())
    assert all(p.problem.count(" ") == 3 for p in sets["chain3"])  # start value + 3 tagged operations
    assert [p.id for p in load_benchmark("chain8")[:2]] == ["chain8-0", "chain8-1"]
    assert is_chain(sets["chain3"]) and chain_k("chain12") == 12 and chain_k("math500") is None
    with pytest.raises(ValueError, match="1..26"):
        load_benchmark("chain99")


def test_chain_sets_from_another_data_seed():
    # chainK@SEED: the task at any horizon from a data seed the demo never evaluates
    assert chain_spec("chain12") == (12, 0) and chain_spec("chain5@7") == (5, 7) and chain_spec("aime24") is None
    assert chain_k("chain5@7") == 5
    other, held = load_benchmark("chain5@7"), load_benchmark("chain5")
    assert other[0].id == "chain5@7-0" and len(other) == len(held)
    assert all(len(p.problem.split()) == 6 for p in other)
    assert not {p.problem for p in other} & {p.problem for p in held}
    assert [p.problem for p in load_benchmark("chain5@0")] == [p.problem for p in held]
    sets = load_problem_sets("chain9@2", limit=3)
    assert list(sets) == ["chain9@2"] and len(sets["chain9@2"]) == 3
    with pytest.raises(ValueError, match="1..26"):
        load_benchmark("chain40@1")


def test_chain_grader_extracts_what_it_grades():
    grade = get_grader("chain")
    texts = ["37 a+5=42\nanswer: 42", "xanswer: 42", "answer: 41", "the answer: 42 is it"]
    vs = grade(texts, ["42"] * 4)
    assert [v.reward for v in vs] == [1, 0, 0, 0]
    # the "extracted" answer is the one the grader compared: an unanchored match would show 42 here
    assert [v.extracted for v in vs] == ["42", None, "41", None]
    assert [v.reason for v in vs] == ["correct", "no_answer", "mismatch", "no_answer"]


def test_grader_registry_and_rewards():
    assert set(GRADERS) == {"math", "chain"} and REWARD_CHOICES == ("math", "chain", "none")
    assert resolve_grader("auto", chain=True)[0] == "chain"
    assert resolve_grader("auto", chain=False)[0] == "math"
    assert reward_fn("none") is None
    assert reward_fn("chain")(["answer: 3", "answer: 4"], ["3", "3"]) == [1.0, 0.0]
    assert as_reward_fn(lambda r, a: [0.5] * len(r))(["x"], ["y"]) == [0.5]
    with pytest.raises(ValueError, match="math, chain"):
        get_grader("regex")


def test_rollout_batch_decodes_its_responses():
    from opdkit.rollout.batch import RolloutBatch

    tok = char_tokenizer()
    ids = [tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
           tok("345", add_special_tokens=False)["input_ids"]]
    T = max(map(len, ids))
    resp = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in ids])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in ids])
    b = RolloutBatch(prompt_ids_BP=torch.zeros(2, 1, dtype=torch.long), prompt_mask_BP=torch.ones(2, 1),
                     response_ids_BT=resp, response_mask_BT=mask, logp_old_BT=torch.zeros(2, T),
                     group_ids_B=torch.arange(2), prompt_index_B=torch.arange(2))
    assert b.response_token_ids() == ids
    assert b.decode(tok) == ["12", "345"]  # EOS is a special token: skipped


def test_segment_params_from_gate_config():
    from opdkit.config import Config
    from opdkit.runtime.gate import segment_params

    g = Config().gate
    g.name, g.block_size = "newline", 8
    p = segment_params(g, char_tokenizer())
    assert p.block_size == 8 and p.newline_token_ids  # the "\n" token id
    g.name = "block"
    assert segment_params(g, char_tokenizer()).newline_token_ids == ()


def test_config_choices_come_from_the_registries():
    from opdkit.config import CHOICES
    from opdkit.gates.registry import SEGMENTERS
    from opdkit.losses.registry import BASE_LOSSES

    assert CHOICES["loss.name"] == tuple(BASE_LOSSES) and CHOICES["gate.name"] == tuple(SEGMENTERS)
    assert CHOICES["rollout.reward"] == REWARD_CHOICES


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
            mods |= {f"{node.module}.{a.name}" for a in node.names}  # ``from pkg import module``
        elif isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
    return mods


def test_no_module_imports_the_cli_and_runtime_imports_nothing_above_it():
    above = ("opdkit.train", "opdkit.eval", "opdkit.diagnose", "opdkit.demo", "opdkit.cli")
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        mods = _imports(path)
        if rel[0] != "cli":
            assert not [m for m in mods if m.startswith("opdkit.cli")], path
        if rel[0] == "runtime":
            assert not [m for m in mods if m.startswith(above)], path


def test_shipped_configs_load_from_the_package_by_name():
    from opdkit.config import ConfigError, load_config, shipped_configs

    names = shipped_configs()
    assert "paper/opd" in names and "paper/lsm_block64" in names
    for name in names:  # every shipped config is valid as it ships
        load_config(name, need_models=False)
    assert load_config("configs/paper/opd_block64.yaml", need_models=False).gate.block_size == 64
    with pytest.raises(ConfigError, match="shipped configs: .*paper/opd"):
        load_config("paper/nope", need_models=False)


MATH = ("losses", "gates")


def test_math_packages_import_only_torch_and_each_other():
    """Pure math (losses, gates, eval/passk.py) never sees a config, a model or the orchestration."""
    files = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] in MATH] + [SRC / "eval" / "passk.py"]
    allowed = tuple(f"opdkit.{m}" for m in MATH)
    for path in files:
        ours = [m for m in _imports(path) if m.startswith("opdkit")]
        assert all(m.startswith(allowed) for m in ours), (path, ours)
        third_party = {m.split(".")[0] for m in _imports(path)} - {"opdkit", "torch", "__future__"}
        import sys

        assert third_party <= set(sys.stdlib_module_names), (path, third_party)


def test_no_import_cycles_between_modules():
    """Every import, also the ones inside functions: a cycle hidden in a function is still a cycle."""
    def name(path: Path) -> str:
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in mods and i != m and not m.startswith(i + ".")} for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_single_token_ids_take_vocab_entries_or_one_id_texts_and_name_the_field():
    from opdkit.runtime.models import single_token_ids
    from opdkit.tokenizer import char_tokenizer

    tok = char_tokenizer()
    a, b = tok("a", add_special_tokens=False)["input_ids"][0], tok("b", add_special_tokens=False)["input_ids"][0]
    assert single_token_ids(tok, ["a", "b"]) == [a, b]
    assert single_token_ids(tok, [tok.eos_token]) == [tok.eos_token_id]
    with pytest.raises(ValueError, match="my.field: 'ab' is not a single token"):
        single_token_ids(tok, ["ab"], field="my.field")
