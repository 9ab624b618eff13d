"""Load, recognise, normalise, curate and tokenize training data."""
