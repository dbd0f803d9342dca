"""Where code lives: sandbox.py is the only place a model-written program starts, grading.py checks answers
without torch and never evaluates model text, sandbox.py needs nothing beyond the standard library, and
each file keeps to its size (README, "Design notes")."""

import ast
import subprocess
import sys

import pytest

from conftest import REPO

# every Python file that ships (scripts, modules, bench); tests build hostile programs on purpose
SHIPPED = sorted([*REPO.glob("*.py"), *REPO.glob("bench/*.py")])
# what starts a program inside or outside the sandbox: the launcher, the bwrap command, the sandbox's python
SANDBOX_INTERNALS = {"run_program", "_LAUNCHER", "_bwrap_command", "SANDBOX_PYTHON", "_watch"}
LINE_BUDGET = {"common.py": 1700, "grading.py": 800, "sandbox.py": 700, "grpo_logprob.py": 700, "raft_pp.py": 450,
               "reinforce_rej.py": 450, "prime.py": 450}


def names_and_strings(tree: ast.AST):
    """(identifiers used, string constants, names of builtins called) of a module."""
    names, strings, calls = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
    return names, strings, calls


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name != "sandbox.py"], ids=lambda p: p.name)
def test_only_sandbox_py_starts_model_written_programs(path):
    names, strings, calls = names_and_strings(ast.parse(path.read_text()))
    assert not names & SANDBOX_INTERNALS, f"{path.name} reaches into the sandbox's launcher: {names & SANDBOX_INTERNALS}"
    assert "bwrap" not in strings and not any(s.startswith("bwrap ") for s in strings), f"{path.name} calls bubblewrap"
    assert not calls & {"exec", "eval", "compile"}, f"{path.name} executes text: {calls & {'exec', 'eval', 'compile'}}"


def test_grading_never_hands_text_to_eval_exec_or_sympify():
    tree = ast.parse((REPO / "grading.py").read_text())
    names, _, calls = names_and_strings(tree)
    assert not calls & {"exec", "eval", "compile"}
    assert not names & {"sympify", "ExprExtractionConfig"}  # Math-Verify's LaTeX extractor only
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m.split(".")[0] == "sympy"}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "parse_expr"]


def imported_by(module: str) -> set[str]:
    """Top-level names of the modules that importing `module` adds, in a fresh interpreter."""
    code = (f"import sys; before = set(sys.modules); import {module}; "
            "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split()) - {module}


def test_sandbox_py_needs_only_the_standard_library():
    assert imported_by("sandbox") <= set(sys.stdlib_module_names)


def test_grading_py_does_not_import_torch():
    modules = imported_by("grading")
    assert "torch" not in modules and "sandbox" in modules


def test_training_scripts_import_only_common_of_the_repository():
    local = {p.stem for p in REPO.glob("*.py")}
    for script in ("grpo_logprob.py", "raft_pp.py", "reinforce_rej.py", "prime.py"):
        tree = ast.parse((REPO / script).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
                   {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert imported & local == {"common"}, f"{script} imports {imported & local}"


@pytest.mark.parametrize("name", sorted(LINE_BUDGET))
def test_files_keep_to_their_line_budget(name):
    assert len((REPO / name).read_text().splitlines()) <= LINE_BUDGET[name]
