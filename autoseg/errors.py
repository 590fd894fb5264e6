"""Errors that reach the user, each with its exit code."""

from __future__ import annotations


class AutosegError(Exception):
    """Base class: the message is one line that the CLI prints as-is."""

    exit_code = 1


class InputError(AutosegError):
    """Bad input or config. The message names the file or field and says how to fix it."""

    exit_code = 2


class DeviceUnreachable(AutosegError):
    """The measurement device cannot be reached (or refused us)."""

    exit_code = 3


class StorageUnreachable(AutosegError):
    """The study's database server cannot be reached (after retries), or the connection to it was lost."""

    exit_code = 3


class StudyNotReady(AutosegError):
    """A worker joined a study whose first process has not recorded its data in time (it may still be preparing)."""

    exit_code = 3
