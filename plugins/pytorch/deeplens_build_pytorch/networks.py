"""Two real networks for tests and benchmarks, written out by hand (torchvision from the registry does not import
beside the CPU build of torch these machines use). Imports only torch: a SageMaker ``code/`` folder can carry this
file as the owner's model definition."""

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Conv→BatchNorm→ReLU, a residual block, max and average pooling, Dropout, Linear, softmax."""

    def __init__(self, classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        pooled = torch.cat([torch.amax(x, dim=(2, 3)), torch.mean(x, dim=(2, 3))], dim=1)
        return torch.softmax(self.fc(self.drop(pooled)), dim=1)


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 as torchvision defines it (11.7 M parameters at 1000 classes)."""

    def __init__(self, classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, layers, inputs = (64, 128, 256, 512), [], 64
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers.append(nn.Sequential(BasicBlock(inputs, width, stride), BasicBlock(width, width, 1)))
            inputs = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.softmax(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)), dim=1)


def trained(module, seed=0):
    """``module`` in eval mode with batch norm statistics as training would leave them (not 0 and 1)."""
    torch.manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 1.5)
    return module.eval()
