"""The one exception type fashionrec raises for problems a user can fix."""


class FashionrecError(Exception):
    """A problem with the user's input, files or environment.

    The message is a single line meant for a person: the CLI prints it as
    ``error: <message>`` and exits non-zero, without a traceback.
    """


class StoreUnavailable(FashionrecError):
    """The catalog's store (a Milvus server) did not answer: nothing the user's input
    can fix; the service answers 503 with :attr:`public` (its clients are not told
    the store's address) and tries again."""

    public = "the catalog's store did not answer"
