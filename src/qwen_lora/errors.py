"""Errors that tell the user which file, tensor or parameter is at fault."""

import json
from pathlib import Path
from typing import Any


class ModelLoadError(ValueError):
    """A model directory, weight file or tensor that cannot be loaded; the message names it."""


class AdapterError(ValueError):
    """An adapter directory that does not fit the model it is loaded onto."""


class DataError(ValueError):
    """A malformed dataset record; the message names the file and line."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a NaN or infinite loss); the message names the step and the last
    good checkpoint, which is kept as it was."""


def read_json_object(file: Path, error: type[Exception], missing: str) -> dict[str, Any]:
    """Parse the JSON object in `file`; a missing file, bad JSON (with its line) or another
    JSON value raises `error` naming the file."""
    try:
        data = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise error(f"{file}: {missing}") from None
    except json.JSONDecodeError as err:
        raise error(f"{file}:{err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise error(f"{file}: expected a JSON object")
    return data
