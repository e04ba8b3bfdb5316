"""The error a udi command line reports as one line (no traceback) and a non-zero exit status."""


class RunError(RuntimeError):
    """A run cannot start or go on: the message names the flag or the file and the way out."""


class UnreadableImage(RunError):
    """An image file of an ImageFolder cannot be read (truncated, not an image): the run stops naming it."""


def one_line(error: BaseException) -> str:
    """The message of a RunError, also when a data-loader worker re-raised it inside its traceback text."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):  # torch.utils.data's re-raise in the main process
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ":") else last
    return " ".join(lines)
