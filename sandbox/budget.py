"""How many session channels one SSH connection may hold open at once."""

from __future__ import annotations

# OpenSSH's MaxSessions default. Servers may allow fewer; we learn their real limit when they refuse.
DEFAULT_SESSION_LIMIT = 10


class ChannelBudget:
    """Counts the session channels (shells, exec, SFTP) open on one connection.

    The limit starts at OpenSSH's default and only ever goes down: when the server refuses a channel
    while `in_use` are open, `in_use` is what it really allows (MaxSessions), and asking for more
    would only produce more refusals.
    """

    def __init__(self, limit: int = DEFAULT_SESSION_LIMIT) -> None:
        self.limit = limit
        self.in_use = 0

    @property
    def available(self) -> int:
        return max(0, self.limit - self.in_use)

    def try_acquire(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use = max(0, self.in_use - 1)

    def learn_refusal(self) -> None:
        """The server refused a channel we had reserved: the others open are its real limit."""
        self.release()
        self.limit = max(1, min(self.limit, self.in_use))
