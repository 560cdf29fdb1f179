"""The SMFSR trainer: ``accelerate launch smfsr_trainer/train.py --config CONFIG``.

Stages share one loop; each stage is the loss it adds (``stages/``)."""
