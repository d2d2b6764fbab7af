"""Checkpoints: writing them, the training state they carry, their names, when they are taken,
and finding the newest.

- `writer`: the checkpoint folder (a diffusers pipeline, written atomically), its single file,
  and the exact weights of frozen models;
- `state`: the training state's format on disk (``training_state/``), reading and checking it;
- `checkpointer`: the trainer's side: gathering the training state, restoring it, saving;
- `names`: checkpoint names, where checkpoints go, and the longest name a run can need;
- `periodic`: the component that saves every n epochs and every n minutes;
- `find_last`: ``resume_ckpt: findlast``.

Nothing is imported here: `periodic` is a component, and components import the writer.
"""
