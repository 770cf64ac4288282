"""The application: the training command and its parts, one concept per module. A user's own
training loop needs none of it (``import horovod_leader as hl`` is the library).

* ``command``: the training command (``python -m horovod_leader.train``): options, checks and
  the ``Trainer``, which owns its state (``Trainer.state_dict()``);
* ``data``, ``data_mnist1d``: the data sets (digits, MNIST-1D, CIFAR-10, synthetic);
* ``models``: the networks (the papers' CNN7, ResNet-20, VGG-16, MLPs, ...);
* ``augment``: random crops and flips of whole batches of tensors (the papers' CIFAR-10
  transform and the standard one);
* ``pipeline``: which samples each rank trains on in each epoch, in batches, augmented;
* ``evaluation``: test accuracy of the centre, the workers, the leader and each group's
  centre, with batch-norm statistics re-estimated;
* ``clock``: training time with evaluation excluded, wall time, and rank 0's clock agreed at
  every step; ``schedule``: the loop's cadences (budget, evaluations, LR, checkpoints);
* ``checkpoint``: checkpoint files (atomic, one per rank, loaded as data only);
* ``presets``: ``--preset paper``, the authors' hyperparameters (each method's own in its
  ``MethodSpec``); ``resume``: ``--resume OUT``, the saved configuration restored and checked;
* ``progress``: rank 0's progress, a bar on a terminal, plain lines on piped output;
* ``flatness``: ``--flatness``, the Hessian of a run's centre at its end;
* ``report``: runs into a table and plots (``python -m horovod_leader.report``).
"""
