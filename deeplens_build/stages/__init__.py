"""The pipeline's stages, one module each, in the order :mod:`deeplens_build.pipeline` runs them: fetch, detect,
convert, optimize, parity (its reference run first), precision, compile, parity, profile, runtime, lambda_package,
greengrass, record (the manifest), bundle. Each module's ``run`` states the key its result is cached under,
beside the work; detection and conversion themselves are the framework plugins'."""
