"""How much of a GPU INN training step is kernel-launch overhead: the eager step (with and without
a per-step sync) against the same step (forward, backward, Adam) captured once as a CUDA graph and
replayed. GPU only; not part of ``run.py``. Results are in ``benchmarks/README.md``.

    python benchmarks/cuda_graph_probe.py            # on a GPU machine, from the checkout's root
"""
import json
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from flow_vs_freia import LR, build_ours, nll_per_dim  # noqa: E402

from captum_inn.inn import ConditionalINN  # noqa: E402

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)


def per_step(fn, n):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n


def loss_of(call, x, c):
    v, logdet = call(x, c)
    return nll_per_dim(v, logdet)


def eager(model, call, x, c, item):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    def step():
        loss = loss_of(call, x, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if item:
            loss.item()
    return step


def graphed(model, call, x, c):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR, capturable=True)
    sx, sc = x.clone(), c.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss_of(call, sx, sc).backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = loss_of(call, sx, sc)
        static_loss.backward()
        opt.step()
    def step():
        sx.copy_(x)
        sc.copy_(c)
        graph.replay()
    return step


def cases():
    torch.manual_seed(0)
    x, c = torch.randn(256, 128, device=dev), torch.randn(256, 128, device=dev)
    for blocks in (8, 20):
        flow = build_ours(blocks).to(dev)
        with torch.no_grad():
            flow(x, c)
        yield f"flow_{blocks}_blocks_batch256", flow, (lambda m: lambda a, b: m(a, b))(flow), x, c
    inn = ConditionalINN(128, (512, 2, 2), n_blocks=8, hidden=256, embed_dim=128, conv_width=64, conv_max_width=128).to(dev)
    zc, zx = torch.randn(128, 512, 2, 2, device=dev), torch.randn(128, 128, device=dev)
    with torch.no_grad():
        inn(zx, zc)
    yield "conditional_inn_layer4_batch128", inn, (lambda a, b: inn(a, b)), zx, zc


results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__}
for name, model, call, x, c in cases():
    r = {"eager_sync_each_step_ms": 1e3 * per_step(eager(model, call, x, c, True), 40),
         "eager_no_sync_ms": 1e3 * per_step(eager(model, call, x, c, False), 40)}
    if dev.type == "cuda":
        try:
            r["cuda_graph_ms"] = 1e3 * per_step(graphed(model, call, x, c), 100)
        except Exception as error:  # record why capture failed; the eager figures stay
            r["cuda_graph_error"] = f"{type(error).__name__}: {error}"[:500]
    results[name] = r
    print(name, r, flush=True)
print(json.dumps(results, indent=1))
