"""The parts of the training command, one concept per module.

* ``augment``: random crops and flips of whole batches of tensors (the papers' CIFAR-10
  transform and the standard one);
* ``pipeline``: which samples each rank trains on in each epoch, in batches, augmented;
* ``evaluation``: test accuracy of the workers, the leader, the centre and each group's
  centre, with batch-norm statistics re-estimated;
* ``clock``: training time with evaluation excluded, and wall time;
* ``presets``: ``--preset paper``, the authors' hyperparameters;
* ``resume``: ``--resume OUT``, the saved configuration restored and checked;
* ``progress``: rank 0's progress, a bar on a terminal, plain lines on piped output.

``horovod_leader.train`` puts them together.
"""
