"""tether's engine: what you do with an SSH endpoint.

Connections, persistent shells, background jobs, files and search over SFTP and the shell. This
package knows nothing of providers, MCP or tunnels.
"""

from .endpoint import SSHEndpoint
from .errors import SandboxError
from .executor import RunResult
from .files import Edit, EditResult, FileStat, Image, ReadResult, WriteResult
from .jobs import Job, JobOutput
from .pool import ConnectionPool, default_pool
from .sandbox import Sandbox
from .search import GlobResult, GrepResult
from .state import StateStore, default_store, state_dir

__all__ = [
    "ConnectionPool",
    "Edit",
    "EditResult",
    "FileStat",
    "GlobResult",
    "GrepResult",
    "Image",
    "Job",
    "JobOutput",
    "ReadResult",
    "RunResult",
    "SSHEndpoint",
    "Sandbox",
    "SandboxError",
    "StateStore",
    "WriteResult",
    "default_pool",
    "default_store",
    "state_dir",
]
