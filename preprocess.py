"""Preprocess an image folder into training shards (thin CLI; see coredi_fast/data/preprocess.py).

    python preprocess.py --input /data/imagenet/train --output /data/in256 --image-size 256 \
        [--vae stabilityai/sd-vae-ft-ema | --vae /path/to/vae | --no-vae] [--shard-size 10000] [--num-workers 8]
"""
from coredi_fast.data.preprocess import main

if __name__ == "__main__":
    main()
