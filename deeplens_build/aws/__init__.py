"""What talks to AWS or writes for it: Lambda publishing, the Greengrass documents and recipe format, deploy.
(S3 and SageMaker sources are the built-in source plugin, :mod:`deeplens_build.builtin.sources`; KMS signing is
in :mod:`deeplens_build.signing`; every boto3 client comes from :mod:`deeplens_build.clients`.)"""
