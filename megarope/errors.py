"""The one exception type that the CLI turns into a single line and exit code 2, and what lies behind
an exception that a library raised."""

from collections.abc import Iterator


class UsageError(Exception):
    """Bad input from the user: a flag, a config value, a missing file."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception behind it: its causes and contexts, and the ranks' failures that
    torch.distributed.checkpoint gathered into a CheckpointException (each once)."""
    stack, seen = [error], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException's {rank: (exception, traceback)}
        if isinstance(failures, dict):
            stack += [failure[0] for failure in failures.values()]
