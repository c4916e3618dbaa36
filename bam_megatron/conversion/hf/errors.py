"""The one error type of the Hugging Face converter."""

from bam_megatron.errors import UserError


class ConversionError(UserError):
    """Input the converter cannot use (missing file, unsupported setting, wrong model type); one line naming it."""
