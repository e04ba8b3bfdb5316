"""The argparse types and checks every udi command line shares (udi.train, the evaluations, udi.visualize): a value
that does not fit is argparse's error naming the flag (exit status 2), before anything runs."""
import argparse
import math
import os

from udi_kernels.checks import SMALLEST_TEMPERATURE

SEED_RANGE = 2 ** 32  # numpy's seeds: 0 <= seed < 2**32


def str2bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true / false), got {value!r}")


def int_in(low: int, high: int):
    """An argparse type: an int in [low, high]."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int in [{low}, {high}], got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected an int in [{low}, {high}], got {value}")
        return number
    parse.__name__ = f"int in [{low}, {high}]"  # argparse's "invalid <name> value" message
    return parse


def float_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite float in [low, high] (in (low, high] with low_open)."""
    interval = f"{'(' if low_open else '['}{low}, {high}]"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {value!r}") from None
        if not math.isfinite(number) or not (low < number if low_open else low <= number) or number > high:
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}, got {value}")
        return number
    parse.__name__ = f"float in {interval}"
    return parse


NON_NEGATIVE_FLOAT, POSITIVE_FLOAT = float_in(0.0, 1e6), float_in(0.0, 1e6, low_open=True)
# a loss temperature: the kernels scale the logits by its reciprocal in float32 (udi_kernels.checks.check_temperature)
TEMPERATURE = float_in(SMALLEST_TEMPERATURE, 1e6)
SEED = int_in(0, SEED_RANGE - 1)


def existing_file(value: str) -> str:
    """An argparse type: the path of a file that exists."""
    if not os.path.isfile(value):
        reason = "a folder, not a file" if os.path.isdir(value) else "no such file"
        raise argparse.ArgumentTypeError(f"{value}: {reason}")
    return value


def existing_folder(value: str) -> str:
    """An argparse type: the path of a folder that exists."""
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value}: no such folder")
    return value


def unwritable(path: str):
    """Why the folder `path` (created if missing) cannot be written, or None: its first existing ancestor must be a
    writable folder."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def output_folder(value: str) -> str:
    """An argparse type: a folder that exists and is writable, or can be created."""
    reason = unwritable(value)
    if reason:
        raise argparse.ArgumentTypeError(f"{value}: {reason}")
    return value


def output_file(value: str) -> str:
    """An argparse type: a file path whose folder exists and is writable, or can be created (not a folder)."""
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    reason = unwritable(os.path.dirname(os.path.abspath(value)))
    if reason:
        raise argparse.ArgumentTypeError(f"{value}: {reason}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help of every udi and benchmark command line: each flag's default after its help, except a default of
    None, whose help says what happens without the flag."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)
