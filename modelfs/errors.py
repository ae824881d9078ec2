"""The errors modelfs reports to users, and the errno a reader of the mount gets for each.

Every error is one line that names the thing at fault and says what to do. The CLI prints
``modelfs: error: <message>`` and exits non-zero; the filesystem fails the one read that met it
with the errno ``errno_of`` gives and logs the message.
"""

import errno


class ModelfsError(Exception):
    """Base class: ``str(error)`` is the one-line message shown to the user."""


class BadReferenceError(ModelfsError):
    """A reference string that cannot be parsed."""


class ManifestError(ModelfsError):
    """A manifest or layer that modelfs refuses to mount (hostile or malformed)."""


class RegistryError(ModelfsError):
    """The registry answered with an error (unknown tag, denied, bad response)."""


class AuthError(RegistryError):
    """The registry refused the credentials, or none were given where needed."""


class NotFoundError(RegistryError):
    """The repository, tag or blob does not exist."""


class RegistryUnavailableError(RegistryError):
    """The registry did not answer within the retries and timeout."""


class IntegrityError(ModelfsError):
    """Bytes that do not match their digest: never served."""


class PieceAlteredError(IntegrityError):
    """A piece's bytes do not match the piece index."""


class CacheError(ModelfsError):
    """The local cache cannot be opened or written."""


class StreamLostError(CacheError):
    """A piece of a decompressed layer's stream, which only the cache holds, is gone from it."""


class InternalError(ModelfsError):
    """A state modelfs should never reach (a bug): logged with its traceback."""


# The errno of a read that failed: the nearest of the error's classes named here decides. The
# rest failed to get or check the bytes, which a reader knows as EIO: a registry that is down
# (as an NFS server that is), an altered piece, a corrupt archive, a broken cache.
_ERRNOS: dict[type[BaseException], int] = {
    ModelfsError: errno.EIO,
    # Refused by the registry: the reader may not have these bytes, nothing is broken.
    AuthError: errno.EACCES,
    # The blob went from the registry (or layout) after the mount pinned it: as NFS says of a
    # file deleted on the server under an open handle.
    NotFoundError: errno.ESTALE,
}


def errno_of(error: BaseException) -> int:
    """The errno a reader gets when ``error`` failed its read (EIO for anything unforeseen)."""
    return next((_ERRNOS[cls] for cls in type(error).__mro__ if cls in _ERRNOS), errno.EIO)
