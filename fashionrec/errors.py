"""The one exception type fashionrec raises for problems a user can fix."""


class FashionrecError(Exception):
    """A problem with the user's input, files or environment.

    The message is a single line meant for a person: the CLI prints it as
    ``error: <message>`` and exits non-zero, without a traceback.
    """
