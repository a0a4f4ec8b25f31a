"""Typed errors raised by the sandbox engine.

Every message says what happened and what to do next: the MCP layer hands them to agents verbatim.
"""

from __future__ import annotations

from pydantic import ValidationError


class SandboxError(Exception):
    """Base class of everything tether's engine raises on purpose."""


# --- connecting -------------------------------------------------------------------------------------


class ConnectError(SandboxError):
    """The SSH connection could not be established."""


class Unreachable(ConnectError):
    """Nothing answered at the endpoint's address."""


class ConnectTimeout(ConnectError):
    """Connecting or logging in took longer than allowed."""


class AuthFailed(ConnectError):
    """The server refused every credential offered."""


class HostKeyMismatch(ConnectError):
    """The server's host key differs from the one pinned on first use."""

    def __init__(self, host: str, port: int, pinned: str, presented: str) -> None:
        self.host, self.port, self.pinned, self.presented = host, port, pinned, presented
        super().__init__(
            f"host key for {host}:{port} changed: pinned {pinned}, server presented {presented}. "
            "This can mean the machine was rebuilt, or that someone is intercepting the connection. "
            f"If you expect the change, remove the pin with `tether forget-host {host}:{port}` and retry."
        )


class SandboxEnded(SandboxError):
    """The machine ended (destroyed, expired) while this operation ran; its command was stopped."""

    def __init__(self, name: str, why: str) -> None:
        self.why = why
        super().__init__(
            f"sandbox {name} ended while this ran ({why}); its command was stopped. Create a new sandbox to go on"
        )


class ConnectionLost(SandboxError):
    """The connection died while an operation that cannot be retried safely was in flight."""


class InvalidEndpoint(SandboxError, ValueError):
    """An SSH address or ssh_config alias could not be understood."""


# --- files ------------------------------------------------------------------------------------------


class FileOperationError(SandboxError):
    """A file operation failed; `path` names the remote path."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


class FileNotFound(FileOperationError, FileNotFoundError):
    def __init__(self, path: str, hint: str = "") -> None:
        super().__init__(path, f"{path}: no such file or directory{hint or '; check the path (glob, or ls with run)'}")


class IsADirectory(FileOperationError, IsADirectoryError):
    def __init__(self, path: str, hint: str = "") -> None:
        super().__init__(path, f"{path} is a directory; {hint or f'list its files with glob (pattern *, path {path})'}")


class NotADirectory(FileOperationError, NotADirectoryError):
    def __init__(self, path: str, message: str | None = None) -> None:
        super().__init__(path, message or f"{path}: a component of the path is not a directory")


class PermissionDenied(FileOperationError, PermissionError):
    def __init__(self, path: str, hint: str = "") -> None:
        super().__init__(path, f"{path}: permission denied for the sandbox user{hint}")


# How a file comes off the box, for a message that suggests it: there is no download tool (an
# agent's answer is no place for megabytes), so a person or a script does it.
DOWNLOAD_HINT = "`tether cp SANDBOX:PATH .` on tether's host, or Sandbox.download in Python"


class BinaryFile(FileOperationError):
    def __init__(self, path: str, size: int) -> None:
        self.size = size
        super().__init__(
            path,
            f"{path} is a binary file ({size} bytes), not shown as text; look into it with run (file, "
            f"xxd | head), or download it: {DOWNLOAD_HINT}",
        )


class SpecialFile(FileOperationError):
    """A named pipe, socket or device: opening it over SFTP could block (a pipe with no writer) or
    never end (/dev/zero)."""

    def __init__(self, path: str, what: str, hint: str = "") -> None:
        hint = hint or f"read it with run instead (e.g. `timeout 5 head -c 4096 {path}`)"
        super().__init__(path, f"{path} is {what}, not a regular file; {hint}")


# A write renames a new file over the old: over a pipe or a device that would put a plain file in
# its place (think /dev/null on a box where the agent is root).
WRITE_DIRECTORY_HINT = "write and edit take a file's path: name a file inside it"
WRITE_SPECIAL_HINT = "tether writes by replacing files, which would replace it too; write to it with run instead"


class FileTooLarge(FileOperationError):
    def __init__(self, path: str, size: int, limit: int) -> None:
        self.size, self.limit = size, limit
        super().__init__(
            path,
            f"{path} is {size} bytes, over the {limit}-byte limit; shrink it with run, or download it: {DOWNLOAD_HINT}",
        )


def edit_label(index: int | None) -> str:
    """Which of a multi_edit's edits a message is about, by its place in the list as sent (from 0,
    as an agent indexes its own JSON array), or nothing for a single edit."""
    return "" if index is None else f"edits[{index}]: "


class NoMatch(FileOperationError):
    """An edit's old_string does not occur in the file."""

    def __init__(self, path: str, edit_index: int | None = None) -> None:
        self.edit_index = edit_index
        which = edit_label(edit_index)
        super().__init__(
            path,
            f"{which}old_string not found in {path}; read the file again and copy the text exactly, "
            "including whitespace and indentation",
        )


class NotUnique(FileOperationError):
    """An edit's old_string occurs more than once and replace_all was not set."""

    def __init__(self, path: str, count: int, lines: list[int], edit_index: int | None = None) -> None:
        self.count, self.lines, self.edit_index = count, lines, edit_index
        which = edit_label(edit_index)
        distinct = sorted(set(lines))
        shown = ", ".join(str(n) for n in distinct[:20]) + (", …" if len(distinct) > 20 else "")
        super().__init__(
            path,
            f"{which}old_string matches {count} times ({'line' if len(distinct) == 1 else 'lines'} {shown}) in {path}: "
            "add surrounding context or set replace_all",
        )


class InvalidEdit(FileOperationError, ValueError):
    """An edit that can never apply (old == new, empty old_string on a non-empty file, …)."""

    def __init__(self, path: str, reason: str, edit_index: int | None = None) -> None:
        self.edit_index = edit_index
        which = edit_label(edit_index)
        super().__init__(path, f"{which}{reason}")


class EditConflict(FileOperationError):
    """The file changed between tether reading it and writing the edit back."""

    def __init__(self, path: str) -> None:
        super().__init__(
            path, f"{path} changed while the edit was being applied; nothing was written. Read it again and retry"
        )


# --- commands and jobs ------------------------------------------------------------------------------


class CommandTimeout(SandboxError, TimeoutError):
    """A command tether ran for itself (`exec_raw`: grep, glob, probes) timed out and was killed.
    `run` reports an agent's command timing out in its result (`timed_out`) instead."""

    def __init__(self, command: str, timeout: float) -> None:
        self.command, self.timeout = command, timeout
        super().__init__(f"command timed out after {timeout:g}s and was killed: {command[:200]}")


class SearchTimeout(SandboxError, TimeoutError):
    """A grep, or a glob's listing, ran too long and was stopped."""

    def __init__(self, tool: str, root: str, timeout: float, narrower: str) -> None:
        super().__init__(f"{tool} in {root} ran over {timeout:g}s and was stopped; search {narrower}")


class ShellsBusy(SandboxError):
    """No shell became free in time (every session the server allows was in use); nothing ran."""


class JobNotFound(SandboxError, LookupError):
    def __init__(self, job_id: str, where: str = " in this sandbox; list jobs with job_list") -> None:
        self.job_id = job_id
        super().__init__(f"no background job {job_id!r}{where}")


class StateUnusable(SandboxError, OSError):
    """tether's own state (its directory, its SQLite database) cannot be used."""


class InvalidArgument(SandboxError, ValueError):
    """An argument that tether refuses before anything is sent."""


def validation_problems(exc: ValidationError, names: dict[str, str] | None = None) -> str:
    """pydantic's report as one line per problem's parameter and message, without its links.
    `names`: what to call a field instead (a command line's option that sets it)."""

    def where(loc: tuple[int | str, ...]) -> str:
        field = ".".join(str(part) for part in loc) or "arguments"
        return (names or {}).get(field, field)

    return "; ".join(f"{where(e['loc'])}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
