"""The compression methods. `interface.py` is what a method plugs into: the prunable-model
interface every model family implements (`prunable_linears()`, `structured_units()`,
`rebuild()`) and the training loop's `Method` hooks. `self_pinching.py` (SPG gates),
`magnitude.py` (UMP and mixed-sparsity baselines), `hardconcrete.py` (L0 gates) and `kmeans.py`
(NumPy k-means and unit merging) import nothing from spg but `interface.py`, so each can be
copied out with at most that file. `l0.py` (the L0 method and its final pruning) and
`clustering.py` (parameter clustering, structured magnitude pruning) apply them to any model
that implements the interface (wav2vec2/HuBERT and Whisper)."""
