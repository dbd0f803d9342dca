"""The README stays true: its two set-up commands, CI's command, and every flag of the scripts."""

import dataclasses
import importlib
import re

import pytest

from conftest import REPO


def first_code_block(section: str) -> str:
    text = (REPO / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1]
    match = re.match(r"\s*```bash\n(.*?)\n```", body, re.S)
    assert match, f"README section '## {section}' must open with a ```bash block"
    return match.group(1).strip()


def test_quickstart_and_tests_are_one_command_each():
    for section in ("Quickstart", "Tests"):
        assert "\n" not in first_code_block(section)


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert first_code_block("Tests") in ci


@pytest.mark.parametrize("script", ["grpo_logprob", "raft_pp", "reinforce_rej", "prime"])
def test_every_flag_is_documented(script):
    """Each script's flags appear in its own README section (the `## ` heading that names the script,
    up to the next `## ` heading)."""
    module = importlib.import_module(script)
    sections = ("\n" + (REPO / "README.md").read_text()).split("\n## ")
    section = next((s for s in sections if f"{script}.py" in s.split("\n", 1)[0]), None)
    assert section, f"README.md has no '## ' section whose heading names {script}.py"
    missing = [f.name for f in dataclasses.fields(module.Args) if f"--{f.name}" not in section]
    assert not missing, f"{script}.py flags missing from its README section: {missing}"


@pytest.mark.parametrize("script", ["data_prep", "eval"])
def test_every_command_line_option_is_documented(script):
    """data_prep.py and eval.py use argparse: each `--option` they define appears in the README."""
    source = (REPO / f"{script}.py").read_text()
    options = set(re.findall(r'add_argument\(\s*"(--[a-z_]+)"', source))
    assert options, f"found no options in {script}.py"
    readme = (REPO / "README.md").read_text()
    missing = sorted(o for o in options if o not in readme)
    assert not missing, f"{script}.py options missing from README.md: {missing}"


def test_grader_case_count():
    """The README's number of grading cases is the table's in tests/test_grading.py."""
    from test_grading import CASES

    match = re.search(r"answer grading on (\d+) \(output, reference, expected\) cases", (REPO / "README.md").read_text())
    assert match, "README.md no longer states the number of grading cases"
    assert int(match[1]) == len(CASES)
