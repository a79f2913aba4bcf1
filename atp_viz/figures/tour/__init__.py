"""The guided tour "How ATP works" (the Tour page), in four parts:

- :mod:`.data`: :class:`~.data.TourData` (one layer, head and rank of a captured text) and the maps;
- :mod:`.layout`: panels, titles and presenter mode shared by the figures;
- :mod:`.figures` and :mod:`.toy`: one figure per step, and the 2-D toy;
- :mod:`.steps`: the steps in teaching order (:data:`~.steps.STEPS`), with their texts and formulas.
"""
