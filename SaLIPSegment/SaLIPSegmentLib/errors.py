"""Errors a user can act on, each with the exit code the `salip` command returns for it.

Anything else that escapes is a bug and exits with 1 and a traceback.

======  ==============================================================
code    meaning
======  ==============================================================
0       success
1       internal error (a bug: please report it with the traceback)
2       command-line usage error (argparse)
3       bad input: missing or unreadable file, wrong dimensions, empty volume,
        unknown preset, empty prompt, slice range out of bounds; for `salip batch`,
        one or more cases failed (the summary and the manifest say which)
4       model problem: missing or corrupt weights, checksum mismatch, bad device
5       output problem: output exists, directory not writable
130     cancelled by the user (Ctrl-C or a cancel request)
======  ==============================================================
"""

from __future__ import annotations


class SalipError(Exception):
    """Base class: a message meant for the user, and an exit code."""

    exit_code = 1


class InputError(SalipError):
    """The input volume, prompt or options cannot be used."""

    exit_code = 3


class UnknownPresetError(InputError):
    """A preset name that does not exist."""


class ModelError(SalipError):
    """A model cannot be built or its weights cannot be found or trusted."""

    exit_code = 4


class MissingWeightsError(ModelError):
    """Weights are not on this machine and could not be downloaded."""


class ChecksumError(ModelError):
    """A weights file does not have the SHA256 it must have."""


class OutputError(SalipError):
    """The output cannot be written where asked."""

    exit_code = 5


class Cancelled(SalipError):
    """The user cancelled; nothing partial is handed back."""

    exit_code = 130
