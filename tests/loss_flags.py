"""The PU loss flags at their defaults, for tests that call a training step without a command line."""

from __future__ import annotations

import argparse

from pu_diffusion.checks import resolve_loss_options
from pu_diffusion.flags import add_pu_arguments


def default_loss_flags(**overrides) -> argparse.Namespace:
    """The PU loss flags at their command-line defaults, then ``overrides`` (which may add other flags),
    settled as at parse time."""
    parser = argparse.ArgumentParser(add_help=False)
    add_pu_arguments(parser)
    args = argparse.Namespace(**{**vars(parser.parse_args([])), **overrides})
    resolve_loss_options(args)
    return args
