"""The error types every layer raises and the CLI maps to one line and an exit code.

Each message says what is wrong and what to do next; the CLI prints ``str(err)`` as is.
"""
from __future__ import annotations


class DsftError(Exception):
    """Base of every error dsft reports to a user. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(DsftError):
    """Bad input on the command line or in a config file (wrong name, bad value, bad path)."""

    exit_code = 2


class NotFoundError(DsftError):
    """Something named by the user (domain, base, adapter, file) does not exist."""

    exit_code = 3


class DataError(DsftError):
    """A data file is missing, empty or malformed; the message names the file and the line."""

    exit_code = 4


class UnsupportedModelError(DsftError):
    """The model is not an MoE, or its architecture is not in dsft's table."""

    exit_code = 5


class IntegrityError(DsftError):
    """A stored file does not match its recorded sha256, or a directory is not what it claims to be."""

    exit_code = 6


class IncompatibleError(DsftError):
    """An adapter does not fit a base model version; the message lists every reason."""

    exit_code = 7


class DivergedError(DsftError):
    """Training produced a non-finite loss; the run stops and registers nothing."""

    exit_code = 10


class RegistryError(DsftError):
    """The registry database cannot be opened, migrated or written."""

    exit_code = 8


def show(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing user input in a message: a 5,000-character
    name or a whole parsed file must not fill the terminal (nor print a file's contents back)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}... ({len(text):,} chars)"
