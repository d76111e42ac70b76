"""The pipeline's stages, one module each, in the order :mod:`deeplens_build.pipeline` runs them: fetch,
optimize, parity, runtime (and its image), lambda. Detection and conversion are the framework plugins'."""
