"""The one exception type for problems the user must fix.

The CLI prints an `LdmError` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class LdmError(Exception):
    """Bad input or environment: the message names what is wrong and how to fix it."""

    exit_code = 2


class Preempted(LdmError):
    """The job was asked to stop (SIGTERM/SIGINT) and did so cleanly; the run can resume."""

    exit_code = 143  # 128 + SIGTERM: schedulers read it as "terminated", not "succeeded"
