"""Low-rank-aware fine-tuning: LoRA adapters trained with ATP in place (the paper's claim 4).

- :mod:`.config`: a run's settings and result;
- :mod:`.data`: training texts / windows from the docstring corpus;
- :mod:`.objectives`: the leak-free objectives (encoder distillation, strictly causal next-token loss);
- :mod:`.training`: :func:`~.training.train` (train, save, reload, evaluate);
- :mod:`.evaluation`: held-out metrics and the tables of finished runs;
- :mod:`.job`: a run in a background thread for the app.

Runs on disk (reading, listing, loading with the adapters merged) are :mod:`atp_viz.hf.tuned`.
"""
