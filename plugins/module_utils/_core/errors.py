# -*- coding: utf-8 -*-
# Copyright: snapchain developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Typed errors of the collection.

PRIVATE to snapchain.vmbackup: not a public API, may change without notice.

Library code raises these; only a module's ``main()`` turns them into
``fail_json``.  ``details`` carries structured context (a command's argv, rc,
stderr, an offset...) that ends up in the task result.
"""

from __future__ import annotations


class SnapchainError(Exception):
    """Base class: a failure with a message meant for the operator."""

    def __init__(self, msg, **details):
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def to_result(self):
        result = {"msg": self.msg}
        result.update(self.details)
        return result


class InputError(SnapchainError):
    """Bad input, detected before anything was changed."""


class CommandError(SnapchainError):
    """An external command failed (details: cmd, rc, stdout, stderr)."""


class CephError(SnapchainError):
    """librados/librbd refused or failed."""


class NotFoundError(SnapchainError):
    """A pool, image, snapshot, file or point that must exist does not."""


class ConflictError(SnapchainError):
    """The requested change conflicts with existing state (clones, locks...)."""


class LockedError(ConflictError):
    """Another run holds the lock of a repository directory."""


class DiffFormatError(SnapchainError):
    """A malformed ``rbd diff v1`` stream."""


class RepositoryError(SnapchainError):
    """A backup repository is inconsistent or cannot be written safely."""


class TransferError(SnapchainError):
    """Reading from a source or writing to a target failed mid-transfer."""
