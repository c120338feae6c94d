"""spg: compressing self-supervised speech models (wav2vec2, HuBERT) for speech recognition.

`spg.load(path)`, `spg.save(model, path)` and `spg.export_hf(model, folder)` come from
`spg.loading`; they are imported on first use so that `import spg.wer` needs no torch.
"""

__all__ = ["load", "save", "export_hf"]


def __getattr__(name: str):
    if name in __all__:
        from spg import loading
        return getattr(loading, name)
    raise AttributeError(f"module 'spg' has no attribute {name!r}")
