"""The built-in plugins: the source kinds (local paths, ``s3://``, ``sagemaker-job:``) and the default target
backend (``onnxruntime``). Each is written against the public face (:mod:`deeplens_build`) as a third party's would
be, and registered through the same entry-point group by the core's own distribution."""
