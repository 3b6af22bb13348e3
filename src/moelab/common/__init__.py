"""The lowest layer: what every stage shares and nothing model-specific.

``atomic`` (outputs written atomically, never over what moelab did not write), ``jsonio`` (one JSON
writer, one NaN policy), ``figures`` (matplotlib figures saved atomically as PNG), ``progress`` (one
progress bar). Imports nothing from the rest of moelab but :mod:`moelab.errors`.
"""
