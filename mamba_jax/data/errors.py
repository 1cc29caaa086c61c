"""The one exception type of the data package: bad input data or settings, with a message that names the fix."""


class DataError(ValueError):
    """A corpus, tokenizer or data setting that cannot be used; the message says what to change."""
