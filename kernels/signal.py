"""Flags in a signal pad (peer-mapped memory) through which programs on different GPUs meet."""
import triton
import triton.language as tl


@triton.jit
def spin_cas(ptr, expected, value, SEM: tl.constexpr):
    """Swap the int32 flag at `ptr` from `expected` to `value`, retrying until it held `expected`.

    A scalar atomic: one thread of the program does it, at system scope (the flag may live on another
    GPU). Putting a token is spin_cas(peer_flag, 0, 1, "release"); taking one is spin_cas(own_flag, 1, 0,
    "acquire"), which leaves the flag 0 again, so tokens need no epochs and CUDA graphs replay them as
    they are. Pair it with tl.debug_barrier() so the program's other threads are ordered with it.
    """
    old = tl.atomic_cas(ptr, expected, value, sem=SEM, scope="sys")
    while old != expected:
        old = tl.atomic_cas(ptr, expected, value, sem=SEM, scope="sys")
