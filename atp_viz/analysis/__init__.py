"""Analyses on a loaded model: activation capture, dense vs ATP comparisons, spectra, lengths,
serving (compressed KV cache, strictly causal perplexity), fine-tuning and the benchmark."""
