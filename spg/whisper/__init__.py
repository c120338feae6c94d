"""Whisper (arXiv 2212.04356), split by concern as openai/whisper is:

    model.py        the network (`Whisper`, `WhisperConfig`) and greedy decoding
    audio.py        the log-mel front end
    tokenizer.py    the byte-level BPE tokenizer
    io.py           Hugging Face folders, our own file (`save_whisper`), models known by name
    ct2.py          the CTranslate2 reader
    evaluation.py   scoring on transcribed recordings
    training.py     the fine-tuning objective for the shared loop
    clustering.py   data-free clustering and structured magnitude pruning of heads and FFN units

`spg.load` (or `spg.loading.load_whisper`) reads any Whisper source.
"""
