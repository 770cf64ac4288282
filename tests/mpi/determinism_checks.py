"""Two seeded runs of each synchronous algorithm give bitwise-equal parameters (CPU, 4 ranks)."""
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_leader as hl
from horovod_leader.training.command import Trainer, build_parser, validate
from _common import check

topo = hl.init(group_size=2)
root = Path(sys.argv[1])
for algo in ("lsgd", "mgrawa", "lgrawa", "easgd", "localsgd", "dp"):
    with check(f"deterministic_{algo}"):
        finals = []
        for attempt in ("a", "b"):
            args = build_parser().parse_args(["--algo", algo, "--group-size", "2", "--epochs", "3", "--batch-size", "32",
                                              "--lr", "0.05", "--period", "4", "--seed", "7", "--eval-every", "1000",
                                              "--checkpoint-every", "0", "--no-progress",
                                              "--out", str(root / f"{algo}-{attempt}")])
            validate(args)
            trainer = Trainer(args, topo)
            trainer.run()
            finals.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        assert trainer.step == 33
        for key in finals[0]:
            assert torch.equal(finals[0][key], finals[1][key]), (algo, key)
hvd.shutdown()
