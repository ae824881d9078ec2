"""The errors modelfs reports to users.

Every error is one line that names the thing at fault and says what to do. The CLI prints
``modelfs: error: <message>`` and exits non-zero; the filesystem turns errors into EIO for the
reader and logs the message.
"""


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
