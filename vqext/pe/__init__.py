"""Positional encodings. Each is registered through the ``vqext.positional_encodings`` group."""
