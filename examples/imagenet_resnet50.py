"""ImageNet ResNet-50 with LSGD on a GPU cluster: one rank per GPU, groups = nodes.

    srun --mpi=pmix python examples/imagenet_resnet50.py --data /datasets/imagenet --epochs 90
    horovodrun -np 16 -H node1:8,node2:8 python examples/imagenet_resnet50.py --data /datasets/imagenet

--data holds train/ and val/ in torchvision's ImageFolder layout. Each rank reads a disjoint
shard of the training images. Horovod should be built with HOROVOD_GPU_OPERATIONS=NCCL.
"""
import argparse
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms

import horovod_leader as hl

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True)
parser.add_argument("--epochs", type=int, default=90)
parser.add_argument("--batch-size", type=int, default=64, help="per GPU")
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--period", type=int, default=4)
parser.add_argument("--global-period", type=int, default=16)
parser.add_argument("--workers", type=int, default=8, help="data-loading processes per rank")
args = parser.parse_args()

topo = hl.init()
torch.cuda.set_device(hvd.local_rank())
normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
train = torchvision.datasets.ImageFolder(f"{args.data}/train", transforms.Compose([
    transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
val = torchvision.datasets.ImageFolder(f"{args.data}/val", transforms.Compose([
    transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]))
sampler = torch.utils.data.distributed.DistributedSampler(train, num_replicas=topo.size, rank=topo.rank)
loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                                     pin_memory=True, drop_last=True)
val_loader = torch.utils.data.DataLoader(val, batch_size=100, num_workers=args.workers)

model = torchvision.models.resnet50().cuda()
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[30, 60, 80], gamma=0.1)
opt = hl.LSGD(optimizer, model, period=args.period, global_period=args.global_period)

with opt:
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        start = time.time()
        for x, y in loader:
            x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            opt.step(loss)
        scheduler.step()
        if topo.rank == opt.global_leader:  # the leader evaluates itself
            model.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in val_loader:
                    correct += (model(x.cuda()).argmax(1).cpu() == y).sum().item()
                    total += len(y)
            print(f"epoch {epoch}: leader rank {topo.rank}, top-1 {correct / total:.4f}, "
                  f"{time.time() - start:.0f} s, {opt.comm_bytes / 2**30:.1f} GiB sent", flush=True)
