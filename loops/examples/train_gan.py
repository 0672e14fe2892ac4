"""Train a small DCGAN on synthetic 16x16 images, the way pytorch/examples' dcgan/main.py trains on an image folder:
two networks, two Adam optimizers (betas 0.5, 0.999), BCELoss, per batch first the discriminator on a real and a fake
batch (`errD_real.backward()`, `errD_fake.backward()`, `optimizerD.step()`), then the generator
(`errG.backward()`, `optimizerG.step()`), the three D(x)/D(G(z)) figures read with `.item()` every batch, a log line
every `--log-interval` batches and a sample from fixed noise every `--sample-interval` batches.

The images are synthetic (soft discs and bars at random places): nothing is downloaded, nothing is written.

    python loops/examples/train_gan.py --niter 1
    loopmark trace --steps 20 loops/examples/train_gan.py

Host-device syncs per step on CUDA (a step is one round of both optimizers: it ends at `optimizerG.step()`), worked out
from the code below:
  * `real_cpu = data[0].to(device)`: a blocking copy of the host batch ..................................... 1
  * `torch.full(..., device=device)`, `torch.randn(..., device=device)`, `label.fill_(...)`: made on the device ... 0
  * `D_x = output.mean().item()`, `D_G_z1 = ...item()`, `D_G_z2 = ...item()` ................................ 3
  * the forward and backward passes, both Adam steps (their `step` counters live on the host) ............... 0
  * the log line, `errD.item()` and `errG.item()` every `--log-interval` batches ........................... 2 per
    log_interval steps
  * `netG(fixed_noise).detach().cpu()` every `--sample-interval` batches: a device-to-host copy ............. 1 per
    sample_interval steps
  => 4 + 2/log_interval + 1/sample_interval per step: 4.5 with the defaults (5 and 50).
"""

import argparse
import random

import torch
import torch.nn as nn
import torch.optim as optim
import torch.utils.data


class Shapes(torch.utils.data.Dataset):
    """1x16x16 images in [-1, 1]: a soft disc or a bar at a random place."""

    def __init__(self, size, seed=0):
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        cy, cx = torch.randint(4, 12, (2, size), generator=g).float()
        disc = torch.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / 6)
        bar = torch.exp(-((xx - cx[:, None, None]) ** 2) / 2).expand(size, 16, 16)
        kind = torch.rand(size, 1, 1, generator=g) < 0.5
        self.images = (torch.where(kind, disc, bar) * 2 - 1).unsqueeze(1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], 0


def weights_init(m):
    classname = m.__class__.__name__
    if classname.find("Conv") != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find("BatchNorm") != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, nz, ngf):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 2, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 4x4
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(ngf, 1, 4, 2, 1, bias=False), nn.Tanh())  # 16x16

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self, ndf):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),  # 8x8
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),  # 4x4
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


def main():
    parser = argparse.ArgumentParser(description="DCGAN on synthetic shapes")
    parser.add_argument("--batchSize", type=int, default=64, help="input batch size")
    parser.add_argument("--nz", type=int, default=32, help="size of the latent z vector")
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--niter", type=int, default=25, help="number of epochs to train for")
    parser.add_argument("--lr", type=float, default=0.0002, help="learning rate, default=0.0002")
    parser.add_argument("--beta1", type=float, default=0.5, help="beta1 for adam. default=0.5")
    parser.add_argument("--dataset-size", type=int, default=6400)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--sample-interval", type=int, default=50)
    parser.add_argument("--manualSeed", type=int, default=999, help="manual seed")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                        help="train on the GPU (default: when there is one)")
    opt = parser.parse_args()
    print(opt)

    random.seed(opt.manualSeed)
    torch.manual_seed(opt.manualSeed)
    device = torch.device("cuda:0" if opt.cuda else "cpu")
    dataloader = torch.utils.data.DataLoader(Shapes(opt.dataset_size, seed=opt.manualSeed),
                                             batch_size=opt.batchSize, shuffle=True, drop_last=True)

    netG = Generator(opt.nz, opt.ngf).to(device)
    netG.apply(weights_init)
    netD = Discriminator(opt.ndf).to(device)
    netD.apply(weights_init)

    criterion = nn.BCELoss()
    fixed_noise = torch.randn(opt.batchSize, opt.nz, 1, 1, device=device)
    real_label, fake_label = 1.0, 0.0
    optimizerD = optim.Adam(netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))

    samples = []
    for epoch in range(opt.niter):
        for i, data in enumerate(dataloader, 0):
            ############################
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            ###########################
            netD.zero_grad()
            real_cpu = data[0].to(device)
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label, dtype=real_cpu.dtype, device=device)
            output = netD(real_cpu)
            errD_real = criterion(output, label)
            errD_real.backward()
            D_x = output.mean().item()

            noise = torch.randn(batch_size, opt.nz, 1, 1, device=device)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()

            ############################
            # (2) Update G network: maximize log(D(G(z)))
            ###########################
            netG.zero_grad()
            label.fill_(real_label)  # fake labels are real for generator cost
            output = netD(fake)
            errG = criterion(output, label)
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()

            if i % opt.log_interval == 0:
                print(f"[{epoch}/{opt.niter}][{i}/{len(dataloader)}] Loss_D: {errD.item():.4f} "
                      f"Loss_G: {errG.item():.4f} D(x): {D_x:.4f} D(G(z)): {D_G_z1:.4f} / {D_G_z2:.4f}")
            if i % opt.sample_interval == 0:
                with torch.no_grad():
                    samples.append(netG(fixed_noise).detach().cpu())
    print(f"kept {len(samples)} samples of {tuple(samples[0].shape) if samples else ()}")


if __name__ == "__main__":
    main()
