"""The exceptions hakit raises on purpose. Anything else reaching a loop boundary is a bug."""

from __future__ import annotations

from collections.abc import Sequence


class HakitError(Exception):
    """Base of every error hakit reports to an operator."""


class ConfigError(HakitError):
    """One or more problems in the configuration; each line names file, field and fix."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CommandError(HakitError):
    """An external command failed: carries argv, exit code and what it wrote on stderr."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        status = "timed out" if returncode is None else f"exited {returncode}"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"`{' '.join(self.argv)}` {status}: {detail}")


class AgentUnreachable(HakitError):
    """The CLI could not talk to the local agent."""


class LabError(HakitError):
    """The one-machine lab could not do what was asked."""
