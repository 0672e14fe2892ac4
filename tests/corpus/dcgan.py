# Source: pytorch/examples, dcgan/main.py, commit d0b7e3709407074ac64bb34c5af33fe226abb47c: the training loop
"""pytorch/examples' DCGAN loop: two optimizers in one cell. The workload's `build_optimizer(model)` returns
(optimizerD, optimizerG), Adam with betas (0.5, 0.999); per batch: `netD.zero_grad()`, `errD_real.backward()` on the
real batch, `errD_fake.backward()` on `netD(fake.detach())`, `optimizerD.step()`; `netG.zero_grad()`,
`errG.backward()` on `netD(fake)`, `optimizerG.step()`; the log line reads `errD.item()`, `errG.item()`, `D_x`,
`D_G_z1` and `D_G_z2` (three `output.mean().item()`). The networks are small fully connected ones over 8x8 digits
(the example's are convolutional over 64x64 images); `run.model` holds both (`model.netG`, `model.netD`).

The discriminator's step consumes its two backward passes (real and fake); the generator's step consumes
`errG.backward()`, whose gradient also reaches the discriminator's parameters and is cleared by the next
`netD.zero_grad()`. loopmark's baseline cannot run two optimizers, so nothing is compared: `consistent`.

Syncs on CUDA: the five `.item()` of the log line, every batch.
"""

import torch
from torch import nn

import loops
from tests.corpus import digits

EXPECTED_VERDICT = "consistent"
NZ, NGF, NDF = 8, 32, 32
REAL_LABEL, FAKE_LABEL = 1.0, 0.0


def CUDA_SYNCS_PER_STEP(steps: int) -> float:
    """errD.item(), errG.item(), D_x, D_G_z1, D_G_z2."""
    return 5.0


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.netG = nn.Sequential(nn.Linear(NZ, NGF), nn.ReLU(True), nn.Linear(NGF, 64), nn.Tanh())
        self.netD = nn.Sequential(nn.Linear(64, NDF), nn.LeakyReLU(0.2, inplace=True), nn.Linear(NDF, 1),
                                  nn.Sigmoid())


def workload() -> loops.Workload:
    def build_optimizer(model):
        optimizerD = torch.optim.Adam(model.netD.parameters(), lr=2e-4, betas=(0.5, 0.999))
        optimizerG = torch.optim.Adam(model.netG.parameters(), lr=2e-4, betas=(0.5, 0.999))
        return optimizerD, optimizerG

    return loops.Workload(
        name="corpus-dcgan", build_model=GAN, build_optimizer=build_optimizer, criterion=nn.BCELoss(),
        train_data=digits(0, 512, images=False), test_data=digits(512, 640, images=False), batch_size=32,
        drop_last=True, description="pytorch/examples DCGAN loop: two optimizers, D on real and fake, then G",
    )


def train(run: loops.Run):
    netG, netD, criterion, device = run.model.netG, run.model.netD, run.criterion, run.device
    optimizerD, optimizerG = run.optimizer
    for i, data in enumerate(run.batches, 0):
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real_cpu = data[0].to(device) * 2 - 1
        batch_size = real_cpu.size(0)
        label = torch.full((batch_size,), REAL_LABEL, dtype=real_cpu.dtype, device=device)
        output = netD(real_cpu).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        D_x = output.mean().item()
        noise = torch.randn(batch_size, NZ, device=device)
        fake = netG(noise)
        label.fill_(FAKE_LABEL)
        output = netD(fake.detach()).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        D_G_z1 = output.mean().item()
        errD = errD_real + errD_fake
        optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(REAL_LABEL)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        print('[%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f'  # noqa: UP031
              % (i, len(run.batches), errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))
