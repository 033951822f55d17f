import argparse

import pytest

from flcore.errors import UserError
from flcore.settings import str2bool
from flutils.options import parse_args

REFERENCE_FLAGS = ["-data", "-nb", "-m", "-algo", "-gr", "-nc", "-jr", "-rjr", "-lbs", "-ls", "-lr", "-ld", "-ldg",
                   "-fd", "-eg", "-t", "-pv", "-ab", "-go", "-dev", "-did", "-sfn", "-cdr", "-tsr", "-ssr", "-slr",
                   "-sbs", "-se", "-lam", "-mu", "-GPath", "-gbs", "-prompt"]


@pytest.mark.parametrize("text,expected", [("1", True), ("0", False), ("true", True), ("False", False),
                                           ("TRUE", True), ("no", False)])
def test_str2bool(text, expected):
    assert str2bool(text) is expected


def test_str2bool_rejects_other_strings():
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_boolean_flags_parse_zero_as_false():
    # argparse's type=bool would make "-ab 0" True; ours must not.
    args = parse_args(["-ab", "0", "-rjr", "false", "-ld", "1"]).run
    assert args.auto_break is False and args.random_join_ratio is False and args.learning_rate_decay is True
    assert parse_args(["-ab"]).run.auto_break is True


def test_every_reference_flag_is_accepted():
    parser_help = __import__("flutils.options", fromlist=["build_parser"]).build_parser().format_help()
    for flag in REFERENCE_FLAGS:
        assert f"{flag} " in parser_help or f"{flag}," in parser_help, flag


@pytest.mark.parametrize("argv,fragment", [
    (["-jr", "0"], "-jr must be in (0, 1]"),
    (["-jr", "1.5"], "-jr must be in (0, 1]"),
    (["-cdr", "1"], "-cdr"),
    (["-nc", "0"], "-nc"),
    (["-sbs", "1"], "-sbs"),
    (["-pv", "2", "-t", "2"], "-pv"),
    (["--resume"], "--resume needs -sfn"),
])
def test_bad_values_are_one_line_errors(argv, fragment):
    with pytest.raises(UserError) as info:
        parse_args(argv)
    assert fragment in str(info.value) and "\n" not in str(info.value)
