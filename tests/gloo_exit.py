"""Run under ``torchrun --nproc_per_node 2``: leave gloo's worker thread a collective to destroy at exit.

``python gloo_exit.py bare|handler``. The collective is issued during backward (so its captured
thread-local state holds autograd's Python context) and its Python handle dropped at once; the main
thread then keeps the GIL until the interpreter finalizes. Without a handler that releases the GIL at
exit, the worker thread is killed while destroying the collective and the process aborts (SIGABRT).
With ``handler``, ``optitrainer.release_gloo_workers_at_exit`` (what ``OptiTrainer.train``
calls) registers that handler.
"""

import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
if sys.argv[1] == "handler":
    from optitrainer import release_gloo_workers_at_exit

    release_gloo_workers_at_exit()

x = torch.ones(4, requires_grad=True)


def issue_collective(grad):
    dist.all_reduce(torch.ones(8), async_op=True)  # the handle is dropped: the worker thread destroys it
    return grad


x.register_hook(issue_collective)
# printed before backward: writing output releases the GIL, which would let the worker thread finish
print(f"rank {dist.get_rank()} issues the collective", flush=True)
(x * 2).sum().backward()
sys.setswitchinterval(5.0)  # the main thread keeps the GIL while it runs Python
deadline = time.perf_counter() + 1.0  # long enough for the collective to finish on both ranks
while time.perf_counter() < deadline:
    pass
