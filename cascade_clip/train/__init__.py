"""Train the cascaded decoders: inductive, transductive self-training or fully supervised.

Read `train()` in `loop.py` top to bottom; it is the whole story:

  1. join the process group (torchrun) or run alone; seed everything;
  2. decide which classes the decoders are asked about (the "queries"): the seen classes
     in the inductive setting, every class otherwise (cascade_clip.classes);
  3. build CLIP + Cascade-CLIP; read the inductive checkpoint (--init) for self-training;
  4. build the data: cached frozen features (--cache) or images through the augmentation
     (`inputs.py`);
  5. decide (rank 0) whether to resume DIR/ckpt_last.pt: only if it was written for this
     recipe and from these inputs (`provenance.py`: digests of what a run consumes), else
     start, from the --init weights if given (`checkpointing.py`: the run folder's files);
  6. AdamW over every trainable parameter, lr = linear warm-up then poly decay; start or
     resume;
  7. the loop: batch -> logits -> (self-training: pseudo-labels) -> focal + dice loss
     -> backward -> step (`step.py`); log, checkpoint, stop on a non-finite loss.
"""

from cascade_clip.train.loop import NonFiniteLossError, train

__all__ = ["NonFiniteLossError", "train"]
