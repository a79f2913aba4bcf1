"""The benchmark behind ``python -m atp_viz bench`` (``make bench``): what ATP saves, measured.

- :mod:`.layer`: one attention layer with SmolLM2-135M's geometry on random inputs: dense SDPA, dense
  eager (the L x L map the app draws) and ATP's linear form with its basis, at several L and r;
- :mod:`.model`: a whole-model prefill, dense vs ATP, on real text;
- :mod:`.timing`: options, interleaved timing and peak-memory measurement;
- :mod:`.report`: the printed table, and the measured series the Cost page plots.
"""
