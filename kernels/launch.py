"""How the decode step's kernels are launched: as programmatic dependent launches (PDL) where the GPU has them.

A PDL kernel's programs may start while the kernel before it in the stream finishes its last wave; each
waits (`tl.extra.cuda.gdc_wait()`, its first statement) until that kernel has finished and its writes are
visible, so only the launch overlaps, never the work. Every kernel of a chain that waits this way is
ordered after everything before it, since its predecessor could not finish before its own wait returned.
"""
import torch

# Off: every kernel launches plainly (the engine benchmark's `--no-pdl` comparison).
USE_PDL = True


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm90) and later, unless USE_PDL is off."""
    return USE_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_kwargs(pdl: bool) -> dict:
    """The launch options of a Triton kernel launched as a PDL (`pdl`) or not."""
    return {"launch_pdl": True} if pdl else {}
