"""The Wan family (Wan2.1, Wan2.2 text-to-video, diffusers ``WanTransformer3DModel``): ``detect``
(config files, no torch), ``family`` (loading, text, the causal VAE's parallel decode), ``engine``
(the plan). Importing the package loads no torch."""
