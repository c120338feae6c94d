"""The compression methods. `interface.py` is what a method plugs into (the training loop's
`Method` hooks); `self_pinching.py` (SPG gates), `magnitude.py` (UMP and mixed-sparsity
baselines), `hardconcrete.py` (L0 gates) and `kmeans.py` (NumPy k-means and unit merging)
import nothing from spg but `interface.py`, so each can be copied out with at most that
file. `l0.py` (the L0 method and its final surgery) and `clustering.py` (parameter
clustering) apply them to wav2vec2."""
