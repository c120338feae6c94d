"""Whisper (arXiv 2212.04356), split by concern as openai/whisper is:

    model.py        the network (`Whisper`, `WhisperConfig`), greedy decoding, and its side of the
                    prunable-model interface (`structured_units`, `rebuild`), which
                    spg.compress's clustering, structured magnitude pruning and L0 use
    audio.py        the log-mel front end
    tokenizer.py    the byte-level BPE tokenizer
    io.py           Hugging Face folders, our own file (`save_whisper`), models known by name
    ct2.py          the CTranslate2 reader
    evaluation.py   scoring on transcribed recordings
    training.py     the fine-tuning objective for the shared loop

`spg.load` (or `spg.loading.load_whisper`) reads any Whisper source.
"""
