class ConvertError(ValueError):
    """A PEFT folder or base that cannot be converted; the message says why and what to do."""
