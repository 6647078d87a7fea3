"""Errors that tell the user which file, tensor or parameter is at fault."""


class ModelLoadError(ValueError):
    """A model directory, weight file or tensor that cannot be loaded; the message names it."""


class AdapterError(ValueError):
    """An adapter directory that does not fit the model it is loaded onto."""


class DataError(ValueError):
    """A malformed dataset record; the message names the file and line."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a NaN or infinite loss); the message names the step and the last
    good checkpoint, which is kept as it was."""
