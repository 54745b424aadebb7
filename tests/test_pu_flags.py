"""pu_flags: ranges declared once, shown in --help, refused with the flag named."""

import argparse

import pytest

import pu_flags


def parser_with(flag: str, kind) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument(flag, type=kind, help="what it is.")
    pu_flags.show_ranges(parser)
    return parser


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (pu_flags.POSITIVE_INT, ["1", "7"], ["0", "-1"]),
        (pu_flags.NON_NEGATIVE_INT, ["0", "3"], ["-1"]),
        (pu_flags.POSITIVE_FLOAT, ["1e-8", "2"], ["0", "-0.001", "nan"]),
        (pu_flags.OPEN_UNIT_INTERVAL, ["0.1", "0.999"], ["0", "1", "1.5", "nan"]),
        (pu_flags.ADAM_BETA, ["0", "0.999"], ["1", "-0.1"]),
    ],
)
def test_bounded_types_keep_their_range(kind, good, bad):
    parser = parser_with("--value", kind)
    for text in good:
        assert parser.parse_args(["--value", text]).value == kind.kind(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentError, match=f"argument --value: must be {kind.constraint}, got {text}"):
            parser.parse_args(["--value", text])


def test_help_shows_each_range():
    def help_text(flag, kind):
        return " ".join(parser_with(flag, kind).format_help().split())

    assert "what it is. [> 0 and < 1]" in help_text("--prior", pu_flags.OPEN_UNIT_INTERVAL)
    assert "what it is. [>= 1]" in help_text("--steps", pu_flags.POSITIVE_INT)


def test_default_loss_flags_are_the_command_line_defaults():
    flags = pu_flags.default_loss_flags(prior=0.2)
    assert flags.prior == 0.2 and flags.loss_type == "pu" and flags.nonnegative == "nnpu"
    assert flags.positive_risk_weight == 1.0 and flags.sensitive_min_timestep == 0
