"""ResNet-32 for CIFAR with a classifier head and a projection head (docs/method.md: the network).

    python model.py      # parameter counts
"""
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # option A: subsample, zero-pad the new channels (no parameters)
        if self.stride != 1 or self.pad:
            x = F.pad(x[:, :, ::self.stride, ::self.stride],
                      (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + x)


class ResNet32(nn.Module):
    def __init__(self, num_classes, width=64, proj_hidden=2048, proj_dim=128):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, cin = [], width
        for cout, stride in [(width, 1), (2 * width, 2), (4 * width, 2)]:
            stages += [BasicBlock(cin, cout, stride)
                       ] + [BasicBlock(cout, cout, 1) for _ in range(4)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)  # synthetic-unaware branch
        self.proj = nn.Sequential(  # synthetic-aware branch
            nn.Linear(cin, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_hidden), nn.BatchNorm1d(proj_hidden), nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x):  # B x 3 x 32 x 32 -> B x 4w
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        # global average pool; unlike adaptive_avg_pool2d, its CUDA backward is deterministic
        return x.mean((2, 3))

    def project(self, f):  # B x 4w -> B x 128, unit length
        return F.normalize(self.proj(f), dim=1)

    def forward(self, x):
        f = self.features(x)
        return self.fc(f), self.project(f)


def resnet32(num_classes, width=64):
    return ResNet32(num_classes, width)


def param_counts(model):
    """(backbone + classifier, projection head) parameter counts."""
    proj = sum(p.numel() for p in model.proj.parameters())
    return sum(p.numel() for p in model.parameters()) - proj, proj


if __name__ == "__main__":
    for name, c in [("CIFAR-10", 10), ("CIFAR-100", 100)]:
        net, head = param_counts(resnet32(c))
        print(f"{name}: backbone + classifier {net:,} parameters, projection head {head:,}")
