"""Text in: the bundled samples, uploads and typed text, tokenisation, and the docstring corpora."""
