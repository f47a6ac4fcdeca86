"""Global-batch statistics across 2 gloo processes equal the 1-process statistics of the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from coredi_fast.method import TokenBatchNorm, covariance_loss


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, x, grad_out, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        part = x.chunk(2)[rank].clone().requires_grad_(True)
        norm = TokenBatchNorm(x.shape[1], momentum=0.3)
        out = norm(part)
        cov = covariance_loss(out)
        # Gradient of the *global* mean-type loss: each rank holds half of sum(out * grad_out) + cov/2.
        loss = (out * grad_out.chunk(2)[rank]).sum() + cov / 2
        loss.backward()
        result_queue.put((rank,) + tuple(t.detach().numpy().copy() for t in
                                         (out, part.grad, norm.running_mean, norm.running_var, cov)))
        # Both ranks reach here before either tears gloo down: a rank that destroys the group while its peer still
        # has traffic in flight can abort the peer ("terminate called without an active exception", seen on CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_batchnorm_and_covariance_span_both_ranks():
    torch.manual_seed(0)
    x = torch.randn(10, 3) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    grad_out = torch.randn(10, 3)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, x, grad_out, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {r[0]: [torch.from_numpy(a) for a in r[1:]] for r in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    # One process, whole batch, plain torch BatchNorm1d as the independent reference.
    xs = x.clone().requires_grad_(True)
    ref = torch.nn.BatchNorm1d(3, momentum=0.3)
    out = ref(xs)
    cov = covariance_loss(out)
    ((out * grad_out).sum() + cov).backward()

    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), xs.grad, rtol=1e-4, atol=1e-6)
    for r in (0, 1):
        torch.testing.assert_close(results[r][2], ref.running_mean)
        torch.testing.assert_close(results[r][3], ref.running_var)
        torch.testing.assert_close(results[r][4], cov.detach(), rtol=1e-5, atol=1e-7)
