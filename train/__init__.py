"""SAE training: configs, the trainer loop, schedules, dead latents, checkpoints and resume.

`saeworks.train.run.train(job)` runs the `train:` section of a run config (`saeworks train CONFIG`,
`torchrun -m saeworks.train CONFIG`, `accelerate launch -m saeworks.train CONFIG`). This module
imports nothing so that importing `saeworks.train.config` loads no training code.
"""
