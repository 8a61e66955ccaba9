"""The data: digits, the idx reader, checked downloads and the validation split (``datasets``); on-device batches for
Lightning, resumable mid-epoch (``datamodule``)."""
