"""Build DeepSpeed's JIT ops once (CPUAdam for optimizer offload, the CPU shared-memory comm op)
into $TORCH_EXTENSIONS_DIR, so that no training run or test pays for the build:
``python -m gentrain.distributed.build_ops``."""
from __future__ import annotations

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    from deepspeed.accelerator import get_accelerator

    names = ["CPUAdamBuilder"] + (["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else [])
    for name in names:
        t0 = time.perf_counter()
        get_accelerator().create_op_builder(name).load(verbose=False)
        print(f"gentrain: DeepSpeed op {name} ready in {time.perf_counter() - t0:.1f} s "
              f"({os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache/torch_extensions')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
