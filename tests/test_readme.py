"""The README stays true: its two set-up commands, CI's command, and every flag of the scripts."""

import dataclasses
import re

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


def test_every_flag_is_documented():
    import grpo_logprob

    readme = (REPO / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(grpo_logprob.Args) if f"--{f.name}" not in readme]
    assert not missing, f"flags missing from README.md: {missing}"
