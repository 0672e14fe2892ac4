# Source: pytorch/examples, vae/main.py, commit fcce71c1f0ae34bef104aeea8e0e008ea58058a8: VAE, loss_function() and
# train()
"""pytorch/examples' VAE `train(epoch)`: a model that returns `(recon, mu, logvar)` and draws its own noise
(`torch.randn_like` in `reparameterize`), the script's own `loss_function` (binary cross-entropy summed over the
batch + KL divergence), `train_loss += loss.item()`, a log line every `log_interval` batches, and an epoch loss
per sample, `train_loss / len(train_loader.dataset)`; Adam; on scikit-learn's digits (64 pixels in [0, 1]).

The workload's criterion is the same `loss_function` on the model's output and the batch (an autoencoder's
target is its input). The loop takes the baseline's steps with the same noise; its epoch loss is the sum of the
(summed) batch losses over the samples seen, the per-sample mean, which a correct tool accepts as an epoch loss
of this loop as it accepts a sample-weighted mean: `equivalent`.

Syncs on CUDA: `train_loss += loss.item()` every step, and `loss.item() / len(data)` on logged batches
(`batch_idx % LOG_INTERVAL == 0`); the epoch line prints Python floats.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import TensorDataset

import loops
from tests.corpus import digits, kept

EXPECTED_VERDICT = "equivalent"
LOG_INTERVAL = 4  # --log-interval 4 (the default is 10)
PIXELS = 64


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """`loss.item()` every step, one more on each logged batch."""
    return 1 + math.ceil(steps / LOG_INTERVAL) / steps


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, 32)
        self.fc21 = nn.Linear(32, 4)
        self.fc22 = nn.Linear(32, 4)
        self.fc3 = nn.Linear(4, 32)
        self.fc4 = nn.Linear(32, PIXELS)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5*logvar)
        eps = torch.randn_like(std)
        return mu + eps*std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, PIXELS))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


# Reconstruction + KL divergence losses summed over all elements and batch
def loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, PIXELS), reduction='sum')
    # 0.5 * sum(1 + log(sigma^2) - mu^2 - sigma^2)
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


class VAELoss(nn.Module):
    """`loss_function` as a criterion of (model output, target): the workload's loss for loopmark's baseline."""

    def forward(self, output, target):
        recon_batch, mu, logvar = output
        return loss_function(recon_batch, target, mu, logvar)


def workload() -> loops.Workload:
    train_x, test_x = digits(0, 1400, images=False).tensors[0], digits(1400, 1797, images=False).tensors[0]
    return loops.Workload(
        name="corpus-vae",
        build_model=VAE,
        build_optimizer=lambda params: optim.Adam(params, lr=1e-3),
        criterion=VAELoss(),
        train_data=TensorDataset(train_x, train_x),
        test_data=TensorDataset(test_x, test_x),
        batch_size=64,
        description="pytorch/examples VAE: tuple output, its own summed loss, per-sample epoch loss, Adam",
    )


def train(run: loops.Run):
    """The example's train(epoch) for one epoch; returns what it prints as the epoch's average loss."""
    model, optimizer, device, train_loader = run.model, run.optimizer, run.device, run.batches
    state = kept(optimizer, lambda: {"epoch": 0})
    state["epoch"] += 1
    epoch = state["epoch"]
    model.train()
    train_loss = 0
    samples = 0  # len(train_loader.dataset): the samples of this epoch (run.batches has no .dataset)
    for batch_idx, (data, _) in enumerate(train_loader):
        data = data.to(device)
        optimizer.zero_grad()
        recon_batch, mu, logvar = model(data)
        loss = loss_function(recon_batch, data, mu, logvar)
        loss.backward()
        train_loss += loss.item()
        optimizer.step()
        samples += len(data)
        if batch_idx % LOG_INTERVAL == 0:
            print('Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(  # noqa: UP032
                epoch, batch_idx * len(data), len(train_loader) * len(data),
                100. * batch_idx / len(train_loader),
                loss.item() / len(data)))

    print('====> Epoch: {} Average loss: {:.4f}'.format(  # noqa: UP032
          epoch, train_loss / samples))
    return train_loss / samples
