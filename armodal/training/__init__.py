"""Training: the AR LightningModule, loss, callbacks, checkpoint IO and optimiser factories."""

from armodal.training.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_torch_save, read_checkpoint
from armodal.training.lit_module import ARLitModule
from armodal.training.loss import batch_nll, dataset_nll, next_token_nll
from armodal.training.resume import EpochSampler, ResumableLoader

__all__ = [
    "ARLitModule",
    "AtomicCheckpointIO",
    "CheckpointError",
    "EpochSampler",
    "ResumableLoader",
    "atomic_torch_save",
    "batch_nll",
    "dataset_nll",
    "next_token_nll",
    "read_checkpoint",
]
