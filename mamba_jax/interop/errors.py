"""The one error of Hugging Face / checkpoint conversion: what is wrong with the input, and how to fix it."""

from __future__ import annotations


class ConversionError(ValueError):
    """A model directory or checkpoint that cannot be converted; the message names the problem and the fix."""
