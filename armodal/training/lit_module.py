"""ARLitModule: next-token training of the shared transformer on any modality."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from armodal.training.loss import batch_losses, batch_nll
from armodal.training.resume import rng_states, set_rng_states

__all__ = ["ARLitModule"]


class ARLitModule(pl.LightningModule):
    """Owns the loss (teacher-forced next-token cross-entropy), optimisation and EMA.

    ``net`` is the shared :class:`~armodal.models.Transformer`; ``conditioner`` the
    modality's optional prefix encoder; ``optimizer`` / ``scheduler`` are partials
    (``_partial_: true``) taking named parameters / the optimizer.

    ``unlikelihood_weight`` > 0 adds ``weight * sum(-log(1 - p(avoid set)))`` over the target tokens to
    the training loss (divided by the number of target tokens, like the NLL): unlikelihood training
    (Welleck et al. 2019) on the sets of wrong continuations the training batches carry as ``avoid``
    [B, T, V], or [R, B, T, V] with relative weights ``avoid_weight`` [R] (a data-module option, e.g.
    ``modality.data.avoid`` for the chorale grid).  A
    batch with ``avoid`` sets and weight 0, or weight > 0 and no sets, is an error: the setting would
    be silently dropped.  Validation and test report the plain NLL.

    ``distill_weight`` w in (0, 1] trains on the batches' ``soft_targets`` [B, T, V] (a data-module option
    such as ``modality.data.soft_targets``: a teacher's next-token distributions, e.g. a transposition
    ensemble's): each token with a soft target q is trained against ``(1 - w) * one-hot + w * q``
    (knowledge distillation, Hinton et al. 2015), the others against their one-hot target.  The same
    both-ways check as for the avoid sets applies.  ``train/nll`` logs the plain NLL.
    """

    def __init__(
        self,
        net: nn.Module,
        tokenizer: Any = None,
        conditioner: nn.Module | None = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        ema_decay: float | None = None,
        compile: bool = False,
        unlikelihood_weight: float = 0.0,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if (isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float))
                or not 0.0 <= distill_weight <= 1.0):
            raise ValueError(f"module.distill_weight={distill_weight!r}: expected a number in [0, 1]")
        self.distill_weight = float(distill_weight)
        if not (isinstance(unlikelihood_weight, (int, float)) and math.isfinite(unlikelihood_weight)
                and unlikelihood_weight >= 0):
            raise ValueError(f"module.unlikelihood_weight={unlikelihood_weight!r}: expected a number >= 0")
        self.unlikelihood_weight = float(unlikelihood_weight)
        self.net = net
        self.conditioner = conditioner
        self.tokenizer = tokenizer
        self.pad_id = getattr(tokenizer, "pad_id", None)
        self._optimizer = optimizer
        self._scheduler = scheduler
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay:
            self.ema = copy.deepcopy(nn.ModuleDict({"net": net, **({"conditioner": conditioner} if conditioner else {})}))
            self.ema.requires_grad_(False)
        self.compile = compile
        self._train_forward = None
        self.armodal_meta: dict = {}  # set by train(): resolved config, modality name
        self.sampler = None  # set by train(): the modality's sampler, used by SampleCallback
        self.run_dir = None
        self._val_sum = self._val_cnt = 0.0
        self._stage_sums: dict[str, list[float]] = {}

    # -- setup ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        n = self.net.num_params()
        self.num_params = n
        rank_zero_info(f"[armodal] transformer parameters: {n / 1e6:.2f}M ({n:,}); "
                       f"non-embedding {self.net.num_params(exclude_embeddings=True):,}")
        if self.compile and self._train_forward is None:
            self._train_forward = torch.compile(self.net)

    def forward_nll(self, batch: dict, use_ema: bool = False):
        if use_ema and self.ema is not None:
            return batch_nll(self.ema["net"], self.ema["conditioner"] if "conditioner" in self.ema else None, batch, self.pad_id)
        net = self._train_forward if (self._train_forward is not None and self.training) else self.net
        return batch_nll(net, self.conditioner, batch, self.pad_id)

    # -- steps ------------------------------------------------------------------------
    def _batch_term(self, batch: dict, key: str, weight: str, allowed: str, what: str, option: str) -> bool:
        """Whether the batch carries ``key`` for the loss term scaled by ``module.<weight>``; a term with
        its data and no weight, or a weight and no data, is an error (the setting would be dropped)."""
        has = batch.get(key) is not None
        if has != (getattr(self, weight) > 0):
            raise ValueError(
                f"module.{weight} > 0 needs training batches with {what} (a data option such as {option})"
                if not has else f"the training batches carry {what} (e.g. {option}) but module.{weight} is 0: "
                f"set it {allowed}, or turn the data option off")
        return has

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        has_avoid = self._batch_term(batch, "avoid", "unlikelihood_weight", "> 0", "avoid sets",
                                     "modality.data.avoid.parallels=1")
        has_soft = self._batch_term(batch, "soft_targets", "distill_weight", "in (0, 1]", "soft targets",
                                    "modality.data.soft_targets=<teacher file>")
        bs = batch["ids"].shape[0]
        if has_avoid or has_soft:
            net = self._train_forward if self._train_forward is not None else self.net
            out = batch_losses(net, self.conditioner, batch, self.pad_id, unlikelihood=has_avoid, distill=has_soft)
            s, n, ul = out[:3]
            nll = s / n.clamp_min(1)
            loss = nll
            self.log("train/nll", nll, batch_size=bs)
            if has_avoid:
                loss = loss + self.unlikelihood_weight * ul / n.clamp_min(1)
                self.log("train/unlikelihood", ul / n.clamp_min(1), batch_size=bs)
            if has_soft:
                soft_ce, hard_on_soft = out[3]
                loss = loss + self.distill_weight * (soft_ce - hard_on_soft) / n.clamp_min(1)
        else:
            s, n = self.forward_nll(batch)
            loss = s / n.clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/tokens", n, reduce_fx="sum", batch_size=bs)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update, both before any ``on_train_batch_end`` callback:
        a checkpoint saved at step t (``last.ckpt`` every N steps) holds the EMA of step t.  Runs once
        per optimizer step, also with gradient accumulation."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            with torch.no_grad():
                src = dict(self.net.named_parameters(prefix="net"))
                if self.conditioner is not None:
                    src.update(self.conditioner.named_parameters(prefix="conditioner"))
                t = self.global_step + 1  # this step (Lightning counts it once the hook returns)
                decay = min(self.ema_decay, (1 + t) / (10 + t))  # warm-up: early EMA tracks the weights closely
                for name, p in self.ema.named_parameters():
                    p.lerp_(src[name].detach().to(p.dtype), 1.0 - decay)

    def _eval_step(self, batch: dict, stage: str) -> None:
        s, n = self.forward_nll(batch, use_ema=self.ema is not None)
        acc = self._stage_sums.setdefault(stage, [0.0, 0.0])
        acc[0] += float(s)
        acc[1] += float(n)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        s, n = self._stage_sums.pop(stage, [0.0, 0.0])
        t = torch.tensor([s, n], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        nll = (t[0] / t[1].clamp_min(1)).float()
        self.log(f"{stage}/nll", nll, prog_bar=True, sync_dist=False)
        self.log(f"{stage}/bpt", nll / math.log(2), sync_dist=False)
        self.log(f"{stage}/ppl", nll.exp(), sync_dist=False)
        self.log(f"{stage}/tokens", t[1].float(), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self):
        named = list(self.net.named_parameters())
        if self.conditioner is not None:
            named += list(self.conditioner.named_parameters())
        opt = self._optimizer(named)
        if self._scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler(opt), "interval": "step"}}

    # -- checkpoints --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["armodal"] = self.armodal_meta
        checkpoint["rng_states"] = rng_states()  # dropout etc. continue as in an uninterrupted run

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
