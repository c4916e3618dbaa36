"""The data package's error types: every bad input (missing file, invalid line, empty corpus, ...) is a
``DataError`` whose message is one line naming the culprit, so the tools can print it and exit non-zero."""

from bam_megatron.errors import UserError


class DataError(UserError):
    """Bad input to the data tools; the message is one line that names the file, flag or line at fault."""


class MissingFileError(DataError, FileNotFoundError):
    """A file the data tools need does not exist (also a ``FileNotFoundError`` for callers that catch that)."""
