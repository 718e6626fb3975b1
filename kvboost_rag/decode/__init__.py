"""The decode loop: sampling, stop sequences, penalties, constrained decoding (layer 2)."""
