"""The one error type of the Hugging Face converter."""


class ConversionError(ValueError):
    """Input the converter cannot use (missing file, unsupported setting, wrong model type); one line naming it."""
