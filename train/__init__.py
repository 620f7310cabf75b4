"""SAE training: configs, the trainer loop, schedules, dead latents, checkpoints and resume.

`train.run.train(cfg)` runs the `train:` section of a run config (`saeworks train CONFIG`,
`torchrun -m train CONFIG`, `accelerate launch -m train CONFIG`). This module imports nothing so
that `saeworks.run_config` can import `train.config` without a cycle.
"""
