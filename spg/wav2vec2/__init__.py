"""wav2vec2 / HuBERT with a CTC head: the network and its side of the prunable-model interface
(`model.py`: `structured_units`, `rebuild` at new per-block sizes), checkpoint I/O for our format,
Hugging Face folders and fairseq files (`io.py`), and the block-indexed view of rebuilding
(`surgery.py`). Importers depend on the model, never the reverse."""
