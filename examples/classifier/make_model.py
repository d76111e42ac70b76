"""Regenerate model.tar.gz: a tiny MXNet classifier saved as a SageMaker MXNet job leaves it.

Three checkpoints (checkpoint_frequency < epochs), model-shapes.json and a synset.txt of labels, so
`make package` shows the DeepLens path: only the final checkpoint is packaged, and the build says so.

    .venv/bin/python examples/classifier/make_model.py
"""

import tarfile
import tempfile
from pathlib import Path

from deeplens_build_mxnet.testing import residual_classifier, save_checkpoints

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main() -> Path:
    target = Path(__file__).parent / "model.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoints(Path(tmp) / "model", residual_classifier, {"data": (1, 3, 32, 32)}, epochs=3)
        (folder / "synset.txt").write_text("\n".join(LABELS) + "\n")
        with tarfile.open(target, "w:gz") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
    return target


if __name__ == "__main__":
    print(main())
