"""Preprocess an image folder into training shards (thin CLI; see coredi_fast/data/preprocess.py).

    python preprocess.py --input /data/imagenet/train --output /data/in256 --image-size 256 \
        [--vae stabilityai/sd-vae-ft-ema | --vae /path/to/vae | --no-vae] [--shard-size 10000] [--num-workers 8]

The moments come from the VAE's encoder. REPA's preprocessing defaults to stabilityai/sd-vae-ft-mse, ours to
sd-vae-ft-ema: the two share the encoder (their fine-tuning changed only the decoder), so the shards are the same.
"""
from coredi_fast.data.preprocess import main

if __name__ == "__main__":
    main()
