"""The compression methods. `interface.py` is what a method plugs into: the prunable-model
interface every model family implements (`prunable_linears()`, `structured_units()`,
`rebuild()`) and the training loop's `Method` hooks. `self_pinching.py` (SPG gates),
`magnitude.py` (UMP and mixed-sparsity baselines) and `hardconcrete.py` (L0 gates) import
nothing from spg but `interface.py`; `kmeans.py` (NumPy k-means) imports nothing from spg,
and `merging.py` (head/FFN units, merge rules, how many units each module keeps) only
`kmeans.py`; so each can be copied out with at most one other file. `l0.py` (the L0 method
and its final pruning) and `clustering.py` (parameter clustering, structured magnitude
pruning) apply them to any model that implements the interface (wav2vec2/HuBERT and Whisper)."""
