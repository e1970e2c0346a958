"""The one error family every decoder raises."""


class DecodeError(ValueError):
    """Bytes that do not form a valid message; the receive boundary turns it into the
    protocol's answer (or a silent drop) and never lets it escape further."""
