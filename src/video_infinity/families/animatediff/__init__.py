"""The AnimateDiff family (Stable Diffusion 1.5 + a motion adapter, diffusers ``UNetMotionModel``):
``detect`` (config files, no torch), ``family`` (loading, pipeline steps), ``windows`` (the motion
modules' window rules and math), ``engine`` (the plan). Importing the package loads no torch."""
