"""Test accuracy of the workers, the global leader, the centre and each group's centre.

* **worker**: each rank's own model on the whole test set (with ``--eval-subset``, on the
  subset, also in the last record: each rank measures its own alone);
* **leader** (LSGD): the global leader's worker accuracy;
* **centre**: every method's headline, as the authors report it: the workers' average
  x̄ = (1/p) Σ_i x_i, with batch-norm statistics re-estimated (LSGD, GRAWA, local SGD,
  data-parallel SGD); for the methods that keep a centre of their own, that one
  (the wrapper's ``centre()``): EASGD's centre variable x̃, the one-sided EASGD's centre gathered
  from its shards, DiLoCo's outer parameters θ (what every worker restarts from).
  Asynchronous runs measure it on rank 0 alone, between rounds: EASGD's replica, the
  one-sided EASGD's shards read one-sidedly, or else a snapshot of the average taken at a
  round (``DistributedWrapper.request_centre``);
* **group centres** (multi-leader LSGD): the average of each group's workers, re-estimated
  the same way.

Batch-norm re-estimation (``--bn-batches``): the running statistics are reset and recomputed
as the cumulative average over the first K batches of the training set (``full``: all of it,
the authors' choice), in index order, with the test transform. The K batches are shared out
among the ranks that hold the average (batch k to the k mod m-th); each computes the mean of
its batches' statistics, and one all-reduce combines them weighted by batch counts:

    μ = Σ_r k_r μ_r / Σ_r k_r,  σ² = Σ_r k_r σ²_r / Σ_r k_r,

which is exactly the cumulative average over all K batches that one process would compute.
The test set is shared out the same way and the correct counts summed.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

import torch
from torch import nn

from horovod_leader.packing import key_name
from horovod_leader.training.metrics import Accuracy, Metric


def count_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch: int = 1024) -> int:
    """Correctly classified samples among ``images`` (model in evaluation mode)."""
    return int(Accuracy().totals(model, images, labels, device, batch)[0])


def batch_norms(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def reestimate_batch_norm(model: nn.Module, batches) -> int:
    """Reset every batch norm's running statistics and recompute them as the cumulative
    average over ``batches`` (inputs only). Other layers run in evaluation mode, so dropout
    draws no random numbers. Returns the number of batches seen."""
    norms = batch_norms(model)
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(x)
            seen += 1
    model.eval()
    return seen


def merge_batch_norm(model: nn.Module, seen: int, hvd, process_set, name: str) -> None:
    """Combine the members' re-estimated statistics, weighted by their batch counts."""
    norms = batch_norms(model)
    if not norms:
        return
    stats = [t for m in norms for t in (m.running_mean, m.running_var)]
    flat = torch.cat([t.detach().reshape(-1).double() * seen for t in stats] + [torch.tensor([float(seen)],
                                                                                          dtype=torch.float64)])
    flat = hvd.allreduce(flat.cpu(), op=hvd.Sum, name=name, process_set=process_set)
    total = float(flat[-1])
    offset = 0
    for t in stats:
        n = t.numel()
        t.copy_((flat[offset:offset + n] / max(total, 1.0)).view_as(t).to(t.dtype))
        offset += n
    for m in norms:
        m.num_batches_tracked.fill_(int(total))


class Evaluator:
    """Measures a run's accuracies; every rank calls ``record`` at the same step (except the
    intermediate evaluations of asynchronous runs, where only rank 0 measures its worker)."""

    def __init__(self, model: nn.Module, opt, algo: str, pipeline, test_set, topo, hvd, device,
                 bn_batches: Optional[int] = 20, asynchronous: bool = False, metric: Optional[Metric] = None,
                 eval_subset: Optional[int] = None):
        from horovod_leader.registry import METHODS

        self.model, self.opt, self.algo, self.pipeline = model, opt, algo, pipeline
        self.has_leader = METHODS[algo].leader
        self.topo, self.hvd, self.device = topo, hvd, device
        self.bn_batches = bn_batches  # None: a full pass
        self.asynchronous = asynchronous
        self.metric = metric or Accuracy()  # accuracy, or bits per byte (``training.metrics``)
        self.keys = self.metric.keys
        images, labels = test_set.tensors
        self._full = (pipeline.augment.test(images).contiguous(), labels)
        n = len(labels) if eval_subset is None else min(eval_subset, len(labels))
        # the intermediate evaluations' fixed subset: n samples spread evenly over the test set
        pick = torch.linspace(0, len(labels) - 1, n).round().long() if n < len(labels) else slice(None)
        self._subset = (self._full[0][pick], labels[pick])
        self.test_images, self.test_labels = self._subset

    # ------------------------------------------------------------------ pieces
    def worker_accuracy(self) -> float:
        """This rank's own model on the test set (in the run's metric): the whole of it, or with
        ``--eval-subset`` always the subset (every rank measures its own model alone)."""
        images, labels = self._subset
        return self.metric.value(*self.metric.totals(self.model, images, labels, self.device))

    def average_model(self, process_set, name: str, stored: Optional[Dict] = None) -> nn.Module:
        """A copy of the model holding the members' average parameters (with ``stored``: those
        flat tensors instead, a method's own centre)."""
        centre = copy.deepcopy(self.model)
        copies = list(centre.parameters())
        index = {id(p): i for i, p in enumerate(self.model.parameters())}
        with torch.no_grad():
            for key, flat in self.opt.params.items():  # one collective per packed buffer
                if stored is not None:
                    average = stored[key]
                else:  # summed in float32 for a half-precision model
                    average = flat.accumulator().copy_(flat.flat)
                    self.hvd.allreduce_(average, op=self.hvd.Average, name=f"{name}.{key_name(key)}",
                                        process_set=process_set)
                for tensor, view in zip(flat.tensors, flat.views(average)):
                    copies[index[id(tensor)]].copy_(view)
        return centre

    def shared_accuracy(self, model: nn.Module, position: int, members: int, process_set, name: str) -> float:
        """Accuracy on the test set, split among the members (sample k to the k mod m-th)."""
        mine = self.metric.totals(model, self.test_images[position::members], self.test_labels[position::members],
                                  self.device)
        total = self.hvd.allreduce(torch.tensor(mine, dtype=torch.float64), op=self.hvd.Sum, name=name,
                                   process_set=process_set)
        return self.metric.value(float(total[0]), int(total[1]))

    def centre(self, process_set, position: int, members: int, name: str, own_centre: bool = False) -> nn.Module:
        """The members' average with batch-norm statistics re-estimated (identical on every
        member); this member is at ``position`` of ``members``. ``own_centre`` (every rank, the
        global set): the method's own centre where it keeps one (``wrapper.centre()``) instead of
        the average."""
        stored = self.opt.centre() if own_centre else None
        centre = self.average_model(process_set, f"{name}.params", stored)
        if batch_norms(centre):
            seen = reestimate_batch_norm(centre, self.pipeline.evaluation_batches(self.bn_batches, position, members))
            merge_batch_norm(centre, seen, self.hvd, process_set, f"{name}.bn")
        return centre

    @property
    def needs_snapshot(self) -> bool:
        """Asynchronous runs whose centre is the workers' average: it must be taken at a round."""
        return self.asynchronous and self.local_centre() is None

    def local_centre(self) -> Optional[Dict]:
        """The method's own centre (``centre()``), which a rank reads alone while the wrapper is
        open (EASGD's replicated centre variable, the one-sided EASGD's shards read
        one-sidedly), or None when the centre is the workers' average."""
        return self.opt.centre()

    def centre_alone(self, params: Dict, buffers: Optional[Dict] = None) -> float:
        """Accuracy of a centre held by this rank alone (asynchronous runs, rank 0): ``params``
        (and floating ``buffers``) keyed like the wrapper's, batch norm re-estimated over all
        the ``--bn-batches`` batches here, the whole test set."""
        centre = self.average_model(None, "", params)
        if buffers:  # the averaged buffers (re-estimated below where they are batch norm's)
            index = {id(b): i for i, b in enumerate(self.model.buffers())}
            copies = list(centre.buffers())
            with torch.no_grad():
                for key, flat in self.opt.float_buffers.items():
                    for tensor, view in zip(flat.tensors, flat.views(buffers[key])):
                        copies[index[id(tensor)]].copy_(view)
        if batch_norms(centre):
            reestimate_batch_norm(centre, self.pipeline.evaluation_batches(self.bn_batches, 0, 1))
        return self.metric.value(*self.metric.totals(centre, self.test_images, self.test_labels, self.device))

    def centre_accuracy(self, process_set, position: int, members: int, name: str,
                        own_centre: bool = False) -> float:
        """The members' re-estimated average (or the method's own centre) on the test set."""
        centre = self.centre(process_set, position, members, name, own_centre)
        return self.shared_accuracy(centre, position, members, process_set, f"{name}.correct")

    def group_centre_accuracies(self) -> List[float]:
        """Each group's centre, in group order (every group measures its own at once)."""
        topo = self.topo
        mine = self.centre_accuracy(topo.process_set, topo.group_rank, topo.group_size, f"train.group{topo.group}")
        everyone = self.hvd.allgather(torch.tensor([[float(topo.group), mine]], dtype=torch.float64),
                                      name="train.group_centres").tolist()
        by_group = {int(g): acc for g, acc in everyone}
        return [by_group[g] for g in range(topo.num_groups)]

    # ------------------------------------------------------------------ the record
    def record(self, *, step: int, epoch: float, train_seconds: float, wall_seconds: float, mean_loss: float,
               final: bool = False, snapshot: Optional[Dict] = None) -> Optional[Dict]:
        """One metrics record (rank 0 writes it). ``comm_bytes``: collective payload bytes per
        rank; the one-sided EASGD's window traffic is ``one_sided_bytes``. ``snapshot``: an
        asynchronous run's average taken at a round (``take_centre()``)."""
        opt, hvd = self.opt, self.hvd
        self.test_images, self.test_labels = self._full if final else self._subset
        leader = getattr(opt, "global_leader", None)
        one_sided = getattr(opt, "one_sided_bytes", None)  # the one-sided EASGD's traffic (no collectives)
        base = {"train_seconds": train_seconds, "wall_seconds": wall_seconds, "step": step, "epoch": epoch,
                "test_samples": len(self.test_labels)}
        if self.asynchronous and not final:
            # No collectives between refreshes: rank 0 reports its own worker and the centre
            # that it can read alone (its replica, or the snapshot taken at a round).
            if self.topo.rank != 0:
                return None
            own = self.local_centre()
            centre = (self.centre_alone(own) if own is not None else
                      self.centre_alone(snapshot["params"], snapshot["buffers"]) if snapshot is not None else None)
            out = {**base, self.keys["worker0"]: self.worker_accuracy(), self.keys["centre"]: centre,
                   "loss": mean_loss, "comm_bytes": opt.comm_bytes, "global_leader": leader}
            if one_sided is not None:
                out["one_sided_bytes"] = one_sided
            return out
        own = torch.tensor([self.worker_accuracy(), mean_loss, float(opt.comm_bytes), step,
                            float(one_sided or 0)], dtype=torch.float64)
        everyone = hvd.allgather(own.reshape(1, -1), name="train.eval").tolist()
        record = {**base, self.keys["workers"]: [row[0] for row in everyone], "losses": [row[1] for row in everyone],
                  "comm_bytes": [int(row[2]) for row in everyone], "steps": [int(row[3]) for row in everyone],
                  "global_leader": leader, "local_leaders": None,
                  self.keys["centre"]: self.centre_accuracy(hvd.global_process_set, self.topo.rank, self.topo.size,
                                                            "train.centre", own_centre=True)}
        if one_sided is not None:
            record["one_sided_bytes"] = [int(row[4]) for row in everyone]
        if self.has_leader:
            local = -1 if opt.local_leader is None else opt.local_leader
            record["local_leaders"] = hvd.allgather(torch.tensor([[local]]), name="train.leaders").flatten().tolist()
            record[self.keys["leader"]] = record[self.keys["workers"]][leader] if leader is not None else None
            if self.topo.num_groups > 1:
                record[self.keys["groups"]] = self.group_centre_accuracies()
        return record
