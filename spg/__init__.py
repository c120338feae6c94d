"""spg: compressing speech recognition models (wav2vec2, HuBERT, Whisper).

`spg.load(path)`, `spg.save(model, path)`, `spg.export_hf(model, folder)` and the error raised
for a bad checkpoint, `spg.CheckpointError` (defined in `spg.checkpoint`), come from
`spg.loading`; `spg.DataError` (bad corpus input) from `spg.data`. They are imported on first
use so that `import spg.wer` needs no torch.
"""

__all__ = ["load", "save", "export_hf", "CheckpointError", "DataError"]


def __getattr__(name: str):
    if name == "DataError":
        from spg import data
        return data.DataError
    if name in __all__:
        from spg import loading
        return getattr(loading, name)
    raise AttributeError(f"module 'spg' has no attribute {name!r}")
