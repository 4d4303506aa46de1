"""The README's quickstart test command is what CI runs."""
import os
import re

from conftest import REPO_ROOT


def _readme_commands() -> list[str]:
  with open(os.path.join(REPO_ROOT, "README.md")) as f:
    text = f.read()
  quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", quick, flags=re.S)


def test_quickstart_has_exactly_two_commands():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  assert all("\n" not in c for c in commands), "each quickstart command is one line"
  assert "wsss --config=configs/synthetic/cam.py" in commands[0]
  assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(REPO_ROOT, ".ci", "run")) as f:
    ci = f.read()
  assert _readme_commands()[1] in ci
