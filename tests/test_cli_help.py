"""``etr <command> --help``: every option of every subcommand explains itself, with its real default."""

import argparse

import pytest

from etr.cli import build_parser


def subparsers(parser: argparse.ArgumentParser, prefix: str = ""):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subparsers(sub, f"{prefix}{name} ")
    if prefix:
        yield prefix.strip(), parser


COMMANDS = dict(subparsers(build_parser()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command):
    parser = COMMANDS[command]
    missing = [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert missing == [], f"etr {command}: options without help: {missing}"


def test_help_shows_real_defaults_only(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in text and "(default: 0.0)" in text and "(default: auto)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
