"""flags: ranges declared once, shown in --help, refused with the flag named."""

import argparse

import pytest

from pu_diffusion.errors import InputError
from pu_diffusion.flags import (
    ADAM_BETA,
    NON_NEGATIVE_INT,
    OPEN_UNIT_INTERVAL,
    POSITIVE_FLOAT,
    POSITIVE_INT,
    prior_value,
    show_ranges,
)
from pu_diffusion.objective import DEFAULT_SENSITIVE_MAX_SNR
from tests.loss_flags import default_loss_flags


def parser_with(flag: str, kind) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument(flag, type=kind, help="what it is.")
    show_ranges(parser)
    return parser


@pytest.mark.parametrize(
    ("kind", "good", "bad"),
    [
        (POSITIVE_INT, ["1", "7"], ["0", "-1"]),
        (NON_NEGATIVE_INT, ["0", "3"], ["-1"]),
        (POSITIVE_FLOAT, ["1e-8", "2"], ["0", "-0.001", "nan"]),
        (OPEN_UNIT_INTERVAL, ["0.1", "0.999"], ["0", "1", "1.5", "nan"]),
        (ADAM_BETA, ["0", "0.999"], ["1", "-0.1"]),
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

    assert "what it is. [> 0 and < 1]" in help_text("--prior", OPEN_UNIT_INTERVAL)
    assert "what it is. [>= 1]" in help_text("--steps", POSITIVE_INT)


def test_default_loss_flags_are_the_command_line_defaults():
    flags = default_loss_flags(prior=0.2)
    assert flags.prior == 0.2 and flags.loss_type == "pu" and flags.nonnegative == "nnpu"
    # Our two options are on by default; --paper_loss turns both off.
    assert flags.positive_risk_weight == 0.0 and flags.sensitive_max_snr == DEFAULT_SENSITIVE_MAX_SNR
    assert flags.sensitive_min_timestep == 0
    paper = default_loss_flags(paper_loss=True)
    assert paper.positive_risk_weight == 1.0 and paper.sensitive_max_snr is None and paper.sensitive_min_timestep == 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"positive_risk_weight": 0.5}, (0.5, DEFAULT_SENSITIVE_MAX_SNR, 0)),
        ({"sensitive_max_snr": 2.0}, (0.0, 2.0, 0)),
        # The timestep alias replaces the default SNR band instead of adding to it.
        ({"sensitive_min_timestep": 100}, (0.0, None, 100)),
        ({"sensitive_min_timestep": 0}, (0.0, None, 0)),
    ],
)
def test_explicit_loss_options_win_over_our_defaults(given, expected):
    flags = default_loss_flags(**given)
    assert (flags.positive_risk_weight, flags.sensitive_max_snr, flags.sensitive_min_timestep) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"paper_loss": True, "positive_risk_weight": 0.0}, "drop --positive_risk_weight"),
        ({"paper_loss": True, "sensitive_max_snr": 8.5}, "drop --sensitive_max_snr"),
        ({"paper_loss": True, "sensitive_min_timestep": 100}, "drop --sensitive_min_timestep"),
        ({"sensitive_max_snr": 8.5, "sensitive_min_timestep": 100}, "set the same band: give one"),
    ],
)
def test_conflicting_loss_options_are_refused(given, message):
    with pytest.raises(InputError, match=message):
        default_loss_flags(**given)


def test_prior_takes_a_share_or_auto():
    assert prior_value("auto") == "auto" and prior_value("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0 and < 1, got 1.5"):
        prior_value("1.5")
