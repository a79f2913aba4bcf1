"""The transformers integration: model families as data, the attention backend, ATP settings per
call, loading bundled / tiny / local / hub models and fine-tuned runs."""
