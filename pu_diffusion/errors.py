"""The one exception for bad input, and readers of the small text files a user hands in that say which file
could not be read."""

import contextlib
import errno
import json
import shutil
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user. The message names the flag or file at fault."""


class OutputError(RuntimeError):
    """An output could not be written (a full disk); the message names the folder."""


def read_text(path, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` (a flag, or the folder it belongs to) names it in the error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{what}: {path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise InputError(f"{what}: cannot read {path} ({error.strerror})") from error


def read_json(path, what: str):
    """The JSON in ``path``, with the file named in the error when it is not JSON."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as error:
        raise InputError(f"{what}: {path} is not valid JSON ({error.msg}, line {error.lineno})") from error


@contextlib.contextmanager
def reporting_full_disk(folder: Path, what: str):
    """Turn a write that failed for lack of space, however the writer words it (OSError, safetensors, torch),
    into one message that says so and names the folder."""
    try:
        yield
    except Exception as error:
        if disk_is_full(error, folder):
            raise OutputError(
                f"no space left on device: {what} could not be written in {folder}; what was there before is"
                " kept. Free some space (or choose another --output_dir) and run again"
            ) from error
        raise


def disk_is_full(error: BaseException, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if any(marker in str(error) for marker in ("No space left", "StorageFull", "os error 28")):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False
