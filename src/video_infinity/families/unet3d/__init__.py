"""The UNet3D family (ModelScope, ZeroScope, VideoCrafter2): ``detect`` (config files, no torch),
``model`` (loading, the fps-conditioned UNet), ``family`` (the pipeline steps), ``engine`` (the plan).
Kept light: importing the package loads no torch (the pre-flight imports ``detect``)."""
