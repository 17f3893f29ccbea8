# Copied unchanged from the project's shared benchmark folder, shared/bench/torch_ref.py.
# It restates the official junyanz/pytorch-CycleGAN-and-pix2pix pix2pix architecture and
# train step in PyTorch, with the official state_dict keys. It needs torch 2.13 (CPU) in a
# separate venv (`pip install torch==2.13.0`); `python -m p2p_jax.benchmark --what=compare
# --torch_python=VENV/bin/python` runs it there (its --torch_ref defaults to this file).
"""PyTorch pix2pix reference: the official pix2pix architecture (unet_256 G, 70x70 PatchGAN D,
batch norm, dropout 0.5 in the three inner 512 decoder blocks), re-stated for timing.

The module trees mirror the official UnetGenerator / NLayerDiscriminator, so
`torch.save(G.state_dict(), path)` writes a file with the official checkpoint keys
(model.model.0.weight, ...), usable as a test fixture for weight import.

Times one full optimisation step (G forward, D update on fake+real, G update with
GAN + 100*L1), as the official pix2pix model does it, on random tensors.

usage: python torch_ref.py --size 256 --batch 1 --steps 10 [--threads 2]
prints a JSON line: params and median seconds per step.
"""
import argparse, json, statistics, time
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, outer, inner, in_nc=None, sub=None, outermost=False, innermost=False, dropout=False):
        super().__init__()
        self.outermost = outermost
        in_nc = in_nc or outer
        down = nn.Conv2d(in_nc, inner, 4, 2, 1, bias=False)
        if outermost:
            layers = [down, sub, nn.ReLU(True), nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                      nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, nn.BatchNorm2d(inner), sub, nn.ReLU(True),
                      nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=False), nn.BatchNorm2d(outer)]
            if dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class UnetGenerator(nn.Module):
    """Same module tree, hence the same state_dict keys, as the official UnetGenerator."""
    def __init__(self, in_nc=3, out_nc=3, num_downs=8, ngf=64):
        super().__init__()
        self.model = unet(in_nc, out_nc, num_downs, ngf)

    def forward(self, x):
        return self.model(x)


class NLayerDiscriminator(nn.Module):
    """Same module tree, hence the same state_dict keys, as the official NLayerDiscriminator."""
    def __init__(self, in_nc=6, ndf=64, n_layers=3):
        super().__init__()
        self.model = patchgan(in_nc, ndf, n_layers)

    def forward(self, x):
        return self.model(x)


def unet(in_nc=3, out_nc=3, num_downs=8, ngf=64):
    b = Block(ngf * 8, ngf * 8, innermost=True)
    for _ in range(num_downs - 5):
        b = Block(ngf * 8, ngf * 8, sub=b, dropout=True)
    b = Block(ngf * 4, ngf * 8, sub=b)
    b = Block(ngf * 2, ngf * 4, sub=b)
    b = Block(ngf, ngf * 2, sub=b)
    return Block(out_nc, ngf, in_nc=in_nc, sub=b, outermost=True)


def patchgan(in_nc=6, ndf=64, n_layers=3):
    seq = [nn.Conv2d(in_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2 ** n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    prev, mult = mult, min(2 ** n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    seq += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*seq)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--num-downs", type=int, default=8)
    p.add_argument("--ngf", type=int, default=64)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    G = UnetGenerator(num_downs=a.num_downs, ngf=a.ngf)
    D = NLayerDiscriminator(ndf=a.ngf)
    oG = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    oD = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce, l1 = nn.BCEWithLogitsLoss(), nn.L1Loss()
    A = torch.rand(a.batch, 3, a.size, a.size) * 2 - 1
    B = torch.rand(a.batch, 3, a.size, a.size) * 2 - 1

    def step():
        fake = G(A)
        for q in D.parameters():
            q.requires_grad_(True)
        oD.zero_grad()
        pf = D(torch.cat([A, fake.detach()], 1))
        pr = D(torch.cat([A, B], 1))
        lossD = 0.5 * (bce(pf, torch.zeros_like(pf)) + bce(pr, torch.ones_like(pr)))
        lossD.backward()
        oD.step()
        for q in D.parameters():
            q.requires_grad_(False)
        oG.zero_grad()
        pf = D(torch.cat([A, fake], 1))
        lossG = bce(pf, torch.ones_like(pf)) + 100.0 * l1(fake, B)
        lossG.backward()
        oG.step()
        return float(lossG.detach())

    step()  # warm-up
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(json.dumps({
        "impl": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "size": a.size, "batch": a.batch,
        "params_G": sum(q.numel() for q in G.parameters()),
        "params_D": sum(q.numel() for q in D.parameters()),
        "median_s_per_step": round(med, 4), "img_per_s": round(a.batch / med, 3),
    }))


if __name__ == "__main__":
    main()
