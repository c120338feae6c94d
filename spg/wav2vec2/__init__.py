"""wav2vec2 / HuBERT with a CTC head: the network (`model.py`), checkpoint I/O for our format,
Hugging Face folders and fairseq files (`io.py`), and rebuilding a smaller network at new
per-block sizes (`surgery.py`). Importers depend on the model, never the reverse."""
