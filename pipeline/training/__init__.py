"""Local training with PyTorch Lightning: the cache as batches (:mod:`.datamodule`), the
classifier (:mod:`.classifier`), the training and evaluation loop (:mod:`.loop`), checkpoints
(:mod:`.checkpoints`) and pretraining on public data (:mod:`.pretraining`)."""
