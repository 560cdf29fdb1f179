"""User-facing errors: each message says what is wrong and what to do. Doors print them without a
traceback; anything else is a bug and keeps its traceback."""


class SMFSRError(Exception):
    """An error caused by input the user gave (a file, an image, an option)."""


class CheckpointError(SMFSRError):
    """A model file that cannot be used: unreadable, foreign, pickled, or not matching its config."""


class ImageError(SMFSRError):
    """An image that cannot be upscaled: empty, unreadable, too small or too large."""
