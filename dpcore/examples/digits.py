"""The built-in example: a small CNN on scikit-learn's bundled 8x8 digits.

The data ships inside scikit-learn (no download). 1,797 images are split 80/20
(stratified, fixed split) into 1,437 training and 360 test images, standardised
with the training set's mean and standard deviation.

The model uses ``tanh`` activations and average pooling: bounded activations
keep per-sample gradient norms small and even, which suits clipping (Papernot
et al., "Tempered sigmoid activations for deep learning with DP", 2021).
"""

from __future__ import annotations

from torch import nn
from torch.utils.data import TensorDataset

#: The configuration ``dpcore train`` runs when given none (``dpcore train
#: --print-default-config`` prints it as a starting point for your own).
DEFAULT_CONFIG_TOML = """\
# dpcore train: built-in example (small CNN on scikit-learn's 8x8 digits)
target_epsilon = 3.0      # noise is calibrated to spend this over `epochs`
epochs = 30
delta = 1e-5
max_grad_norm = 1.0
seed = 0
grad_sampler = { name = "bk" }        # book-keeping: one backward pass
clipper = { name = "flat" }
noise = { name = "gaussian" }
sampler = { name = "poisson" }
accountant = { name = "prv" }

[train]
model = "digits_cnn"
dataset = "digits"
optimizer = "sgd"
lr = 2.0
batch_size = 256          # sample rate = 1 / ceil(1437 / 256) = 1/6
checkpoint_every = 1      # epochs
keep_last = 2
num_threads = 1           # a model this small runs faster on one CPU thread
"""


def digits_cnn(channels: int = 16, num_classes: int = 10) -> nn.Module:
    """Two tanh conv blocks and a linear head for 1x8x8 inputs (about 6k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * 4, num_classes),
    )


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of (image[1, 8, 8] float32, label int64)."""
    import torch

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        from ..errors import ConfigError

        raise ConfigError(
            "the built-in digits example needs scikit-learn: pip install scikit-learn"
        ) from exc

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    mean, std = float(x_train.mean()), float(x_train.std())

    def tensors(images, labels) -> TensorDataset:  # type: ignore[no-untyped-def]
        images = torch.tensor((images - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(images, torch.tensor(labels, dtype=torch.int64))

    return tensors(x_train, y_train), tensors(x_test, y_test)
