# Source: pytorch/examples, dcgan/main.py, commit d0b7e3709407074ac64bb34c5af33fe226abb47c: the training loop, with a
# planted bug
"""PLANTED BUG: the DCGAN loop with `netD.zero_grad()` deleted. The discriminator's step consumes its two backward
passes plus everything `.grad` already held: its previous step's gradient and what the generator's `errG.backward()`
left on its parameters: `broken`, from what the optimizer consumed alone (no criterion, no baseline needed).

Syncs on CUDA: as the correct loop.
"""

import torch

import loops
from tests.corpus.dcgan import CUDA_SYNCS_PER_STEP, FAKE_LABEL, NZ, REAL_LABEL, workload

__all__ = ["CUDA_SYNCS_PER_STEP", "EXPECTED_VERDICT", "train", "workload"]

EXPECTED_VERDICT = "broken"


def train(run: loops.Run):
    netG, netD, criterion, device = run.model.netG, run.model.netD, run.criterion, run.device
    optimizerD, optimizerG = run.optimizer
    for i, data in enumerate(run.batches, 0):
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
        netG.zero_grad()
        label.fill_(REAL_LABEL)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        D_G_z2 = output.mean().item()
        optimizerG.step()
        print('[%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f'  # noqa: UP031
              % (i, len(run.batches), errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))
