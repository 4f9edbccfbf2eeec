"""Every `ldm` command line the README shows parses, with `section.key=value` overrides
placed before, between and after its options: each placement gives the same arguments."""

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import parse

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    commands = []
    for line in README.read_text().splitlines():
        if not re.match(r"^ldm [a-z]", line.strip()):
            continue
        text = line.split(" #")[0].split(" | ")[0].replace("<digest>", "DIGEST")
        commands.append(shlex.split(text)[1:])
    return commands


COMMANDS = readme_commands()
OVERRIDES = ["train.num_steps=7", "run.name=moved"]


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 15 and {c[0] for c in COMMANDS} >= {"train", "k8s", "submit", "jobs"}


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_parses_with_overrides_anywhere(argv):
    printed = vars(parse(argv))
    if "overrides" not in printed or len(argv) < 2 or argv[1].startswith("-"):
        return  # no CONFIG [OVERRIDES...] in this command line
    # After the config, before each option, and at the end.
    places = sorted({2, len(argv)} | {i for i, a in enumerate(argv) if a.startswith("--")})
    for at in places:
        args = vars(parse(argv[:at] + OVERRIDES + argv[at:]))
        assert sorted(args["overrides"]) == sorted(printed["overrides"] + OVERRIDES), (at, args)
        assert {**args, "overrides": None} == {**printed, "overrides": None}, at
