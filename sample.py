"""Sample from a trained denoiser: `python sample.py --ckpt PATH [...]` (see `python sample.py --help`).

Writes samples.png and an ADM-style samples.npz; under `torchrun --nproc_per_node N` each rank samples its share.
The implementation is `coredi_fast.sampling`.
"""
import sys

from coredi_fast.sampling import main

if __name__ == "__main__":
    main(sys.argv[1:])
